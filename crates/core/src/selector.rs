//! Model selectors, as `plan --restate-model` and `--select-model` take them: a model name, a
//! shell glob over names (`sales.*`), or `tag:NAME` (a glob too: `tag:daily*`); a leading `+`
//! adds every model upstream of what it matches, a trailing `+` every model downstream (`+m`,
//! `m+`, `+tag:daily+`), as SQLMesh's selectors do. A selector that matches nothing is an error
//! naming it, so a typo never selects nothing silently.

use std::collections::{BTreeMap, BTreeSet};

use globset::{Glob, GlobMatcher};

use crate::names::ModelName;

/// A model as selectors see it: its name, tags and parents.
#[derive(Clone, Copy, Debug)]
pub struct Selectable<'a> {
    pub name: &'a ModelName,
    pub tags: &'a [String],
}

enum Pattern {
    Name(GlobMatcher),
    Tag(GlobMatcher),
}

struct Selector {
    pattern: Pattern,
    upstream: bool,
    downstream: bool,
}

fn compile(selector: &str) -> Result<Selector, String> {
    let trimmed = selector.trim();
    let (upstream, rest) = match trimmed.strip_prefix('+') {
        Some(rest) => (true, rest),
        None => (false, trimmed),
    };
    let (downstream, rest) = match rest.strip_suffix('+') {
        Some(rest) => (true, rest),
        None => (false, rest),
    };
    let (tag, text) = match rest.strip_prefix("tag:") {
        Some(rest) => (true, rest),
        None => (false, rest),
    };
    let text = text.trim();
    if text.is_empty() {
        return Err(format!("model selector {selector:?} is empty"));
    }
    if text.contains('+') {
        return Err(format!(
            "model selector {selector:?}: `+` goes before a name (its upstream models) or after it (its downstream models)"
        ));
    }
    let glob = Glob::new(&text.to_lowercase()).map_err(|error| format!("model selector {selector:?}: {error}"))?;
    let matcher = glob.compile_matcher();
    let pattern = if tag { Pattern::Tag(matcher) } else { Pattern::Name(matcher) };
    Ok(Selector { pattern, upstream, downstream })
}

/// Every model reachable from `start` along `edges` (each model's neighbours), `start` excluded.
fn reachable(start: &ModelName, edges: &BTreeMap<&ModelName, Vec<&ModelName>>) -> BTreeSet<ModelName> {
    let mut found = BTreeSet::new();
    let mut pending = vec![start];
    while let Some(model) = pending.pop() {
        for next in edges.get(model).into_iter().flatten() {
            if found.insert((*next).clone()) {
                pending.push(next);
            }
        }
    }
    found
}

/// The models the selectors pick out of `models` (names and tags compared case-insensitively,
/// as SQLMesh normalizes them); `parents` gives each model's parents for `+`. Fails on a
/// malformed selector or one that matches no model.
pub fn select<'a>(
    models: impl IntoIterator<Item = Selectable<'a>> + Clone,
    parents: &BTreeMap<ModelName, Vec<ModelName>>,
    selectors: &[String],
) -> Result<BTreeSet<ModelName>, String> {
    let mut children: BTreeMap<&ModelName, Vec<&ModelName>> = BTreeMap::new();
    let mut parents_of: BTreeMap<&ModelName, Vec<&ModelName>> = BTreeMap::new();
    for (child, its_parents) in parents {
        for parent in its_parents {
            children.entry(parent).or_default().push(child);
            parents_of.entry(child).or_default().push(parent);
        }
    }
    let mut selected = BTreeSet::new();
    for text in selectors {
        let selector = compile(text)?;
        let mut matched = Vec::new();
        for model in models.clone() {
            let hit = match &selector.pattern {
                Pattern::Name(matcher) => matcher.is_match(model.name.to_string().to_lowercase()),
                Pattern::Tag(matcher) => model.tags.iter().any(|tag| matcher.is_match(tag.to_lowercase())),
            };
            if hit {
                matched.push(model.name.clone());
            }
        }
        if matched.is_empty() {
            return Err(format!("model selector {text:?} matches no model"));
        }
        for name in matched {
            if selector.upstream {
                selected.extend(reachable(&name, &parents_of));
            }
            if selector.downstream {
                selected.extend(reachable(&name, &children));
            }
            selected.insert(name);
        }
    }
    Ok(selected)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn names(selected: &BTreeSet<ModelName>) -> Vec<String> {
        selected.iter().map(ToString::to_string).collect()
    }

    #[test]
    fn selects_by_name_glob_and_tag() {
        let models = [
            (ModelName::parse("sales.orders").unwrap(), vec!["daily".to_string()]),
            (ModelName::parse("sales.items").unwrap(), vec![]),
            (ModelName::parse("marketing.visits").unwrap(), vec!["Daily_Web".to_string()]),
        ];
        let selectable = models.iter().map(|(name, tags)| Selectable { name, tags });
        let parents = BTreeMap::from([(models[0].0.clone(), vec![models[1].0.clone()])]);
        let pick = |selectors: &[&str]| {
            select(selectable.clone(), &parents, &selectors.iter().map(ToString::to_string).collect::<Vec<_>>())
        };
        assert_eq!(names(&pick(&["sales.items"]).unwrap()), ["sales.items"]);
        assert_eq!(names(&pick(&["SALES.*"]).unwrap()), ["sales.items", "sales.orders"]);
        assert_eq!(names(&pick(&["tag:daily*"]).unwrap()), ["marketing.visits", "sales.orders"]);
        assert_eq!(names(&pick(&["tag:daily", "sales.items"]).unwrap()), ["sales.items", "sales.orders"]);
        let error = pick(&["sales.order"]).unwrap_err();
        assert!(error.contains("\"sales.order\" matches no model"), "{error}");
        assert_eq!(names(&pick(&["+sales.orders"]).unwrap()), ["sales.items", "sales.orders"]);
        assert_eq!(names(&pick(&["sales.orders+"]).unwrap()), ["sales.orders"]);
        assert_eq!(names(&pick(&["sales.items+"]).unwrap()), ["sales.items", "sales.orders"]);
        assert_eq!(names(&pick(&["+tag:daily_web+"]).unwrap()), ["marketing.visits"]);
        let error = pick(&["sales+items"]).unwrap_err();
        assert!(error.contains("`+`"), "{error}");
        assert!(pick(&["tag:"]).unwrap_err().contains("empty"));
    }
}
