//! A bake file's structure, whatever its syntax: attributes and blocks with their lines.
//! HCL is parsed by hcl-rs's `hcl-edit` parser (whose spans give the lines); JSON bake files
//! follow HCL's JSON mapping as buildx reads it (block types at the top, then labels, then
//! attributes; strings are templates).

use hcl::Expression;
use hcl::edit::Span as _;
use hcl::expr::{ObjectKey, TemplateExpr};
use serde_json::Value;

use crate::{BakeError, BakeFile};

/// An attribute or a block.
#[derive(Debug, Clone)]
pub struct Item {
    /// Its line, when the syntax tells.
    pub line: Option<usize>,
    /// What it is.
    pub kind: Kind,
}

/// An item's kind.
#[derive(Debug, Clone)]
pub enum Kind {
    /// `KEY = EXPR`.
    Attribute {
        /// Its key.
        key: String,
        /// Its expression.
        expr: Expression,
    },
    /// `IDENT "LABEL" { ... }`.
    Block {
        /// Its type (`target`, `variable`, ...).
        ident: String,
        /// Its labels.
        labels: Vec<String>,
        /// Its items.
        body: Vec<Item>,
    },
}

/// The block types of a JSON bake file's top level.
const JSON_BLOCKS: [&str; 4] = ["variable", "target", "group", "function"];

/// The items of `file`: JSON when its name ends in `.json`, HCL otherwise.
pub fn parse(file: &BakeFile) -> Result<Vec<Item>, BakeError> {
    if file.name.ends_with(".json") {
        let value: Value = serde_json::from_str(&file.text).map_err(|e| BakeError {
            file: file.name.clone(),
            line: Some(e.line()),
            message: e.to_string(),
        })?;
        let fail = |message: String| BakeError { file: file.name.clone(), line: None, message };
        let Value::Object(top) = value else { return Err(fail("a bake file is a JSON object".into())) };
        let mut items = Vec::new();
        for (key, value) in top {
            if !JSON_BLOCKS.contains(&key.as_str()) {
                items.push(Item { line: None, kind: Kind::Attribute { key, expr: expression(value) } });
                continue;
            }
            let Value::Object(blocks) = value else { return Err(fail(format!("{key}: not an object of names"))) };
            for (label, body) in blocks {
                let Value::Object(attributes) = body else {
                    return Err(fail(format!("{key} {label:?}: not an object")));
                };
                let body = attributes
                    .into_iter()
                    .map(|(key, value)| Item { line: None, kind: Kind::Attribute { key, expr: expression(value) } })
                    .collect();
                items.push(Item { line: None, kind: Kind::Block { ident: key.clone(), labels: vec![label], body } });
            }
        }
        return Ok(items);
    }
    crate::nesting::check(&file.text, false).map_err(|(line, message)| BakeError {
        file: file.name.clone(),
        line: Some(line),
        message,
    })?;
    let body = hcl::edit::parser::parse_body(&file.text).map_err(|e| BakeError {
        file: file.name.clone(),
        line: Some(e.location().line()),
        message: e.message().to_string(),
    })?;
    Ok(body.iter().map(|structure| item(&file.text, structure)).collect())
}

fn item(text: &str, structure: &hcl::edit::structure::Structure) -> Item {
    let line = structure.span().map(|span| text[..span.start.min(text.len())].matches('\n').count() + 1);
    let kind = match structure {
        hcl::edit::structure::Structure::Attribute(a) => {
            Kind::Attribute { key: a.key.as_str().to_string(), expr: Expression::from(a.value.clone()) }
        }
        hcl::edit::structure::Structure::Block(b) => Kind::Block {
            ident: b.ident.as_str().to_string(),
            labels: b
                .labels
                .iter()
                .map(|label| match label {
                    hcl::edit::structure::BlockLabel::String(s) => s.value().to_string(),
                    hcl::edit::structure::BlockLabel::Ident(i) => i.as_str().to_string(),
                })
                .collect(),
            body: b.body.iter().map(|inner| item(text, inner)).collect(),
        },
    };
    Item { line, kind }
}

/// A JSON value as an expression: strings with `${` or `%{` are templates.
fn expression(value: Value) -> Expression {
    match value {
        Value::Null => Expression::Null,
        Value::Bool(b) => Expression::Bool(b),
        Value::Number(n) => match n.as_f64().and_then(hcl::Number::from_f64) {
            Some(n) => Expression::Number(n),
            None => Expression::Null,
        },
        Value::String(s) if s.contains("${") || s.contains("%{") => {
            Expression::TemplateExpr(Box::new(TemplateExpr::QuotedString(s)))
        }
        Value::String(s) => Expression::String(s),
        Value::Array(items) => Expression::Array(items.into_iter().map(expression).collect()),
        Value::Object(map) => Expression::Object(
            map.into_iter().map(|(k, v)| (ObjectKey::Expression(Expression::String(k)), expression(v))).collect(),
        ),
    }
}
