//! SQLMesh's built-in macro functions, on rendered SQL text: what each expands to, and the small
//! evaluator `@IF`, `@FILTER` and `@EVAL` use for their conditions. Reading the call (its
//! arguments, lambdas and arrays) is `model_file`'s job; this module never sees tokens.

use sqlparser::ast::{BinaryOperator, Expr, UnaryOperator, Value};
use sqlparser::dialect::GenericDialect;
use sqlparser::parser::Parser;

/// A macro function sluice evaluates.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum MacroFunction {
    If,
    Each,
    Filter,
    Reduce,
    Sql,
    Eval,
    SafeAdd,
    SafeSub,
    SafeDiv,
    And,
    Or,
    GenerateSurrogateKey,
}

impl MacroFunction {
    /// The function a lower-cased macro name calls, if sluice evaluates it.
    pub fn from_name(name: &str) -> Option<MacroFunction> {
        Some(match name {
            "if" => MacroFunction::If,
            "each" => MacroFunction::Each,
            "filter" => MacroFunction::Filter,
            "reduce" => MacroFunction::Reduce,
            "sql" => MacroFunction::Sql,
            "eval" => MacroFunction::Eval,
            "safe_add" => MacroFunction::SafeAdd,
            "safe_sub" => MacroFunction::SafeSub,
            "safe_div" => MacroFunction::SafeDiv,
            "and" => MacroFunction::And,
            "or" => MacroFunction::Or,
            "generate_surrogate_key" => MacroFunction::GenerateSurrogateKey,
            _ => return None,
        })
    }

    /// Whether the last argument is a lambda (`x -> …` or `(x, y) -> …`) applied to the items before it.
    pub fn takes_lambda(self) -> bool {
        matches!(self, MacroFunction::Each | MacroFunction::Filter | MacroFunction::Reduce)
    }
}

/// An expression used as an operand: parenthesized unless it is one plain token.
pub fn operand(sql: &str) -> String {
    let trimmed = sql.trim();
    let plain = !trimmed.is_empty()
        && (trimmed.chars().all(|c| c.is_alphanumeric() || c == '_' || c == '.' || c == '"')
            || (trimmed.starts_with('\'')
                && trimmed.ends_with('\'')
                && trimmed[1..trimmed.len() - 1].find('\'').is_none()));
    if plain || is_parenthesized(trimmed) { trimmed.to_string() } else { format!("({trimmed})") }
}

/// Whether the text is one parenthesized group: `(a) AND (b)` is not, `((a) AND (b))` is.
fn is_parenthesized(text: &str) -> bool {
    if !text.starts_with('(') {
        return false;
    }
    let mut depth = 0i32;
    let mut in_string = false;
    for (position, character) in text.char_indices() {
        match character {
            '\'' => in_string = !in_string,
            '(' if !in_string => depth += 1,
            ')' if !in_string => {
                depth -= 1;
                if depth == 0 {
                    return position == text.len() - 1;
                }
            }
            _ => {}
        }
    }
    false
}

/// `@SAFE_ADD(a, b, …)` / `@SAFE_SUB`: NULLs count as 0 unless every field is NULL.
pub fn safe_arithmetic(fields: &[String], operator: &str) -> String {
    let all_null: Vec<String> = fields.iter().map(|field| format!("{} IS NULL", operand(field))).collect();
    let sum: Vec<String> = fields.iter().map(|field| format!("COALESCE({}, 0)", field.trim())).collect();
    format!("CASE WHEN {} THEN NULL ELSE {} END", all_null.join(" AND "), sum.join(&format!(" {operator} ")))
}

/// `@SAFE_DIV(a, b)`: NULL when the denominator is 0.
pub fn safe_div(numerator: &str, denominator: &str) -> String {
    format!("{} / NULLIF({}, 0)", operand(numerator), denominator.trim())
}

/// `@AND(…)` / `@OR(…)`: the conditions that are not NULL, joined; none is TRUE.
pub fn connective(conditions: &[String], connective: &str) -> String {
    let kept: Vec<String> = conditions
        .iter()
        .filter(|condition| !condition.trim().eq_ignore_ascii_case("null"))
        .map(|condition| operand(condition))
        .collect();
    if kept.is_empty() { "TRUE".to_string() } else { kept.join(&format!(" {connective} ")) }
}

/// `@GENERATE_SURROGATE_KEY(a, b, …)`: a hash of the fields as text, NULLs marked, `|` between.
pub fn surrogate_key(fields: &[String], hash_function: &str) -> String {
    let parts: Vec<String> = fields
        .iter()
        .map(|field| format!("COALESCE(CAST({} AS TEXT), '_sqlmesh_surrogate_key_null_')", field.trim()))
        .collect();
    format!("{hash_function}(CONCAT({}))", parts.join(", '|', "))
}

/// A value of the condition evaluator.
#[derive(Clone, Debug, PartialEq)]
pub enum Literal {
    Null,
    Bool(bool),
    Number(f64),
    Text(String),
}

impl Literal {
    /// Python's truthiness, as SQLMesh's evaluator applies it.
    pub fn is_true(&self) -> bool {
        match self {
            Literal::Null => false,
            Literal::Bool(value) => *value,
            Literal::Number(value) => *value != 0.0,
            Literal::Text(text) => !text.is_empty(),
        }
    }

    /// The literal as SQL.
    pub fn to_sql(&self) -> String {
        match self {
            Literal::Null => "NULL".to_string(),
            Literal::Bool(value) => if *value { "TRUE" } else { "FALSE" }.to_string(),
            Literal::Number(value) if value.fract() == 0.0 && value.abs() < 9e15 => format!("{}", *value as i64),
            Literal::Number(value) => value.to_string(),
            Literal::Text(text) => format!("'{}'", text.replace('\'', "''")),
        }
    }
}

/// Evaluates a condition or arithmetic on literals (`'prod' = 'prod'`, `2 > 1 AND TRUE`,
/// `1 + 2`); anything that reads a column or calls a function cannot be known when the model is
/// read, and is an error naming the expression.
pub fn evaluate(sql: &str) -> Result<Literal, String> {
    let expr = Parser::new(&GenericDialect {})
        .try_with_sql(sql)
        .and_then(|mut parser| parser.parse_expr())
        .map_err(|error| format!("cannot read {sql:?} as an expression: {error}"))?;
    evaluate_expr(&expr).ok_or_else(|| {
        format!("cannot evaluate {sql:?} when the model is read; expected literals, comparisons, AND, OR, NOT and arithmetic")
    })
}

fn evaluate_expr(expr: &Expr) -> Option<Literal> {
    Some(match expr {
        Expr::Nested(inner) => evaluate_expr(inner)?,
        Expr::Value(value) => match &value.value {
            Value::Null => Literal::Null,
            Value::Boolean(value) => Literal::Bool(*value),
            Value::Number(number, _) => Literal::Number(number.parse().ok()?),
            Value::SingleQuotedString(text) | Value::DoubleQuotedString(text) => Literal::Text(text.clone()),
            _ => return None,
        },
        Expr::UnaryOp { op: UnaryOperator::Not, expr } => Literal::Bool(!evaluate_expr(expr)?.is_true()),
        Expr::UnaryOp { op: UnaryOperator::Minus, expr } => match evaluate_expr(expr)? {
            Literal::Number(value) => Literal::Number(-value),
            _ => return None,
        },
        Expr::IsNull(inner) => Literal::Bool(evaluate_expr(inner)? == Literal::Null),
        Expr::IsNotNull(inner) => Literal::Bool(evaluate_expr(inner)? != Literal::Null),
        Expr::BinaryOp { left, op, right } => {
            let (left, right) = (evaluate_expr(left)?, evaluate_expr(right)?);
            binary(&left, op, &right)?
        }
        _ => return None,
    })
}

fn binary(left: &Literal, op: &BinaryOperator, right: &Literal) -> Option<Literal> {
    use std::cmp::Ordering;
    let ordering = match (left, right) {
        (Literal::Number(a), Literal::Number(b)) => a.partial_cmp(b),
        (Literal::Text(a), Literal::Text(b)) => Some(a.cmp(b)),
        (Literal::Bool(a), Literal::Bool(b)) => Some(a.cmp(b)),
        _ => None,
    };
    Some(match op {
        BinaryOperator::And => Literal::Bool(left.is_true() && right.is_true()),
        BinaryOperator::Or => Literal::Bool(left.is_true() || right.is_true()),
        BinaryOperator::Eq => Literal::Bool(ordering == Some(Ordering::Equal)),
        BinaryOperator::NotEq => Literal::Bool(ordering.is_some_and(|o| o != Ordering::Equal)),
        BinaryOperator::Lt => Literal::Bool(ordering == Some(Ordering::Less)),
        BinaryOperator::LtEq => Literal::Bool(matches!(ordering, Some(Ordering::Less | Ordering::Equal))),
        BinaryOperator::Gt => Literal::Bool(ordering == Some(Ordering::Greater)),
        BinaryOperator::GtEq => Literal::Bool(matches!(ordering, Some(Ordering::Greater | Ordering::Equal))),
        arithmetic => {
            let (Literal::Number(a), Literal::Number(b)) = (left, right) else { return None };
            Literal::Number(match arithmetic {
                BinaryOperator::Plus => a + b,
                BinaryOperator::Minus => a - b,
                BinaryOperator::Multiply => a * b,
                BinaryOperator::Divide if *b != 0.0 => a / b,
                BinaryOperator::Modulo if *b != 0.0 => a % b,
                _ => return None,
            })
        }
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn conditions_on_literals_evaluate_as_sqlmesh_does() {
        assert_eq!(evaluate("'local' = 'local'"), Ok(Literal::Bool(true)));
        assert_eq!(evaluate("1 + 2 > 2 AND NOT FALSE"), Ok(Literal::Bool(true)));
        assert_eq!(evaluate("'a' = 1"), Ok(Literal::Bool(false)));
        assert_eq!(evaluate("(2 * 3) - 1"), Ok(Literal::Number(5.0)));
        assert!(evaluate("a > 1").unwrap_err().contains("cannot evaluate \"a > 1\""));
    }

    #[test]
    fn expansions_match_sqlmeshs_documented_forms() {
        let fields = vec!["a".to_string(), "b".to_string()];
        assert_eq!(
            safe_arithmetic(&fields, "+"),
            "CASE WHEN a IS NULL AND b IS NULL THEN NULL ELSE COALESCE(a, 0) + COALESCE(b, 0) END"
        );
        assert_eq!(safe_div("a", "b"), "a / NULLIF(b, 0)");
        assert_eq!(connective(&["x > 1".into(), "NULL".into(), "y".into()], "AND"), "(x > 1) AND y");
        assert_eq!(connective(&["NULL".into()], "OR"), "TRUE");
        assert_eq!(
            surrogate_key(&fields, "MD5"),
            "MD5(CONCAT(COALESCE(CAST(a AS TEXT), '_sqlmesh_surrogate_key_null_'), '|', COALESCE(CAST(b AS TEXT), '_sqlmesh_surrogate_key_null_')))"
        );
    }
}
