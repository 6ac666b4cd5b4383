//! Model selectors, as `plan --restate-model` and `--select-model` take them: a model name, a
//! shell glob over names (`sales.*`), or `tag:NAME` (a glob too: `tag:daily*`). A selector that
//! matches nothing is an error naming it, so a typo never selects nothing silently.

use std::collections::BTreeSet;

use globset::{Glob, GlobMatcher};

use crate::names::ModelName;

/// A model as selectors see it: its name and tags.
#[derive(Clone, Copy, Debug)]
pub struct Selectable<'a> {
    pub name: &'a ModelName,
    pub tags: &'a [String],
}

enum Pattern {
    Name(GlobMatcher),
    Tag(GlobMatcher),
}

fn compile(selector: &str) -> Result<Pattern, String> {
    let (tag, text) = match selector.strip_prefix("tag:") {
        Some(rest) => (true, rest),
        None => (false, selector),
    };
    let text = text.trim();
    if text.is_empty() {
        return Err(format!("model selector {selector:?} is empty"));
    }
    if text.starts_with('+') || text.ends_with('+') {
        return Err(format!(
            "model selector {selector:?}: `+` (upstream or downstream models) is not supported; name the models, use a glob (`sales.*`) or a tag (`tag:daily`)"
        ));
    }
    let glob = Glob::new(&text.to_lowercase()).map_err(|error| format!("model selector {selector:?}: {error}"))?;
    let matcher = glob.compile_matcher();
    Ok(if tag { Pattern::Tag(matcher) } else { Pattern::Name(matcher) })
}

/// The models the selectors pick out of `models` (names and tags compared case-insensitively,
/// as SQLMesh normalizes them). Fails on a malformed selector or one that matches no model.
pub fn select<'a>(
    models: impl IntoIterator<Item = Selectable<'a>> + Clone,
    selectors: &[String],
) -> Result<BTreeSet<ModelName>, String> {
    let mut selected = BTreeSet::new();
    for selector in selectors {
        let pattern = compile(selector)?;
        let mut matched = false;
        for model in models.clone() {
            let hit = match &pattern {
                Pattern::Name(matcher) => matcher.is_match(model.name.to_string().to_lowercase()),
                Pattern::Tag(matcher) => model.tags.iter().any(|tag| matcher.is_match(tag.to_lowercase())),
            };
            if hit {
                matched = true;
                selected.insert(model.name.clone());
            }
        }
        if !matched {
            return Err(format!("model selector {selector:?} matches no model of the environment"));
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
        let pick = |selectors: &[&str]| {
            select(selectable.clone(), &selectors.iter().map(ToString::to_string).collect::<Vec<_>>())
        };
        assert_eq!(names(&pick(&["sales.items"]).unwrap()), ["sales.items"]);
        assert_eq!(names(&pick(&["SALES.*"]).unwrap()), ["sales.items", "sales.orders"]);
        assert_eq!(names(&pick(&["tag:daily*"]).unwrap()), ["marketing.visits", "sales.orders"]);
        assert_eq!(names(&pick(&["tag:daily", "sales.items"]).unwrap()), ["sales.items", "sales.orders"]);
        let error = pick(&["sales.order"]).unwrap_err();
        assert!(error.contains("\"sales.order\" matches no model"), "{error}");
        let error = pick(&["+sales.orders"]).unwrap_err();
        assert!(error.contains("`+`"), "{error}");
        assert!(pick(&["tag:"]).unwrap_err().contains("empty"));
    }
}
