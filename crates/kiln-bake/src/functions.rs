//! The standard functions of bake files (a subset of buildx's, grown with the issue; docs list
//! them): each takes evaluated arguments and names itself in its errors.

use serde_json::{Map, Value};

use crate::eval::{number, text_of};

/// Calls the function `name`.
pub fn call(name: &str, args: Vec<Value>) -> Result<Value, String> {
    let fail = |message: String| format!("{name}(): {message}");
    let arity =
        |n: usize| if args.len() == n { Ok(()) } else { Err(fail(format!("takes {n} arguments, not {}", args.len()))) };
    let text = |i: usize| text_of(&args[i]).map_err(fail);
    let value = match name {
        "upper" | "lower" | "trimspace" | "sanitize" => {
            arity(1)?;
            let s = text(0)?;
            Value::String(match name {
                "upper" => s.to_uppercase(),
                "lower" => s.to_lowercase(),
                "trimspace" => s.trim().to_string(),
                _ => {
                    s.chars().map(|c| if c.is_ascii_alphanumeric() || c == '_' || c == '-' { c } else { '_' }).collect()
                }
            })
        }
        "trimprefix" | "trimsuffix" => {
            arity(2)?;
            let (s, affix) = (text(0)?, text(1)?);
            let trimmed = if name == "trimprefix" { s.strip_prefix(&affix) } else { s.strip_suffix(&affix) };
            Value::String(trimmed.unwrap_or(&s).to_string())
        }
        "replace" => {
            arity(3)?;
            Value::String(text(0)?.replace(&text(1)?, &text(2)?))
        }
        "join" => {
            arity(2)?;
            let parts =
                list(&args[1]).map_err(fail)?.iter().map(text_of).collect::<Result<Vec<_>, _>>().map_err(fail)?;
            Value::String(parts.join(&text(0)?))
        }
        "split" => {
            arity(2)?;
            let (separator, s) = (text(0)?, text(1)?);
            Value::Array(s.split(separator.as_str()).map(|p| Value::String(p.to_string())).collect())
        }
        "concat" => {
            let mut all = Vec::new();
            for arg in &args {
                all.extend(list(arg).map_err(fail)?.iter().cloned());
            }
            Value::Array(all)
        }
        "length" => {
            arity(1)?;
            number(match &args[0] {
                Value::Array(items) => items.len(),
                Value::Object(map) => map.len(),
                Value::String(s) => s.chars().count(),
                other => return Err(fail(format!("{other} has no length"))),
            } as f64)
        }
        "contains" => {
            arity(2)?;
            Value::Bool(list(&args[0]).map_err(fail)?.contains(&args[1]))
        }
        "keys" | "values" => {
            arity(1)?;
            let map = object(&args[0]).map_err(fail)?;
            Value::Array(if name == "keys" {
                map.keys().map(|k| Value::String(k.clone())).collect()
            } else {
                map.values().cloned().collect()
            })
        }
        "lookup" => {
            if !(2..=3).contains(&args.len()) {
                return Err(fail(format!("takes 2 or 3 arguments, not {}", args.len())));
            }
            let key = text(1)?;
            match (object(&args[0]).map_err(fail)?.get(&key), args.get(2)) {
                (Some(value), _) => value.clone(),
                (None, Some(default)) => default.clone(),
                (None, None) => return Err(fail(format!("no key {key:?} and no default"))),
            }
        }
        "merge" => {
            let mut merged = Map::new();
            for arg in &args {
                merged.extend(object(arg).map_err(fail)?.clone());
            }
            Value::Object(merged)
        }
        "coalesce" => args
            .into_iter()
            .find(|v| !v.is_null() && *v != Value::String(String::new()))
            .ok_or_else(|| fail("every argument is null or empty".into()))?,
        "equal" | "notequal" => {
            arity(2)?;
            Value::Bool((args[0] == args[1]) == (name == "equal"))
        }
        "not" => match args.as_slice() {
            [Value::Bool(b)] => Value::Bool(!b),
            _ => return Err(fail("takes one true or false".into())),
        },
        "add" | "subtract" | "multiply" | "divide" => {
            arity(2)?;
            let (Some(a), Some(b)) = (args[0].as_f64(), args[1].as_f64()) else {
                return Err(fail("takes two numbers".into()));
            };
            if name == "divide" && b == 0.0 {
                return Err(fail("division by zero".into()));
            }
            number(match name {
                "add" => a + b,
                "subtract" => a - b,
                "multiply" => a * b,
                _ => a / b,
            })
        }
        _ => return Err(format!("unknown function {name}()")),
    };
    Ok(value)
}

fn list(value: &Value) -> Result<&Vec<Value>, String> {
    value.as_array().ok_or_else(|| format!("{value} is not a list"))
}

fn object(value: &Value) -> Result<&Map<String, Value>, String> {
    value.as_object().ok_or_else(|| format!("{value} is not an object"))
}
