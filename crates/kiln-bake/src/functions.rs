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
        _ => return more(name, args).map_err(|e| if e.starts_with("unknown function") { e } else { fail(e) }),
    };
    Ok(value)
}

/// The functions past the first set: strings, collections, numbers, encodings, paths.
fn more(name: &str, args: Vec<Value>) -> Result<Value, String> {
    let arity =
        |n: usize| if args.len() == n { Ok(()) } else { Err(format!("takes {n} arguments, not {}", args.len())) };
    let text = |i: usize| text_of(&args[i]);
    let num = |i: usize| args[i].as_f64().ok_or_else(|| format!("{} is not a number", args[i]));
    Ok(match name {
        "strlen" => {
            arity(1)?;
            number(text(0)?.chars().count() as f64)
        }
        "substr" => {
            arity(3)?;
            let chars: Vec<char> = text(0)?.chars().collect();
            let (offset, length) = (num(1)? as i64, num(2)? as i64);
            let start =
                if offset < 0 { chars.len() as i64 + offset } else { offset }.clamp(0, chars.len() as i64) as usize;
            let end = if length < 0 { chars.len() } else { (start + length as usize).min(chars.len()) };
            Value::String(chars[start..end].iter().collect())
        }
        "title" => {
            arity(1)?;
            let mut out = String::new();
            let mut start = true;
            for c in text(0)?.chars() {
                out.extend(if start { c.to_uppercase().collect::<Vec<_>>() } else { vec![c] });
                start = c.is_whitespace();
            }
            Value::String(out)
        }
        "chomp" => {
            arity(1)?;
            Value::String(text(0)?.trim_end_matches(['\n', '\r']).to_string())
        }
        "trim" => {
            arity(2)?;
            let cutset: Vec<char> = text(1)?.chars().collect();
            Value::String(text(0)?.trim_matches(cutset.as_slice()).to_string())
        }
        "indent" => {
            arity(2)?;
            let pad = " ".repeat(num(0)?.max(0.0) as usize);
            Value::String(text(1)?.lines().collect::<Vec<_>>().join(&format!("\n{pad}")))
        }
        "format" => {
            let Some(spec) = args.first() else { return Err("takes a format".into()) };
            Value::String(format_go(&text_of(spec)?, &args[1..])?)
        }
        "reverse" | "reverselist" => {
            arity(1)?;
            match &args[0] {
                Value::String(s) if name == "reverse" => Value::String(s.chars().rev().collect()),
                other => Value::Array(list(other)?.iter().rev().cloned().collect()),
            }
        }
        "distinct" => {
            arity(1)?;
            let mut out: Vec<Value> = Vec::new();
            for item in list(&args[0])? {
                if !out.contains(item) {
                    out.push(item.clone());
                }
            }
            Value::Array(out)
        }
        "flatten" => {
            arity(1)?;
            fn flat(value: &Value, out: &mut Vec<Value>) {
                match value {
                    Value::Array(items) => items.iter().for_each(|i| flat(i, out)),
                    other => out.push(other.clone()),
                }
            }
            let mut out = Vec::new();
            flat(&args[0], &mut out);
            Value::Array(out)
        }
        "compact" => {
            arity(1)?;
            Value::Array(
                list(&args[0])?
                    .iter()
                    .filter(|v| !v.is_null() && **v != Value::String(String::new()))
                    .cloned()
                    .collect(),
            )
        }
        "coalescelist" => {
            args.iter().find(|v| v.as_array().is_some_and(|a| !a.is_empty())).cloned().ok_or("every list is empty")?
        }
        "element" => {
            arity(2)?;
            let items = list(&args[0])?;
            if items.is_empty() {
                return Err("the list is empty".into());
            }
            items[(num(1)?.max(0.0) as usize) % items.len()].clone()
        }
        "index" | "indexof" => {
            arity(2)?;
            let position = list(&args[0])?
                .iter()
                .position(|v| *v == args[1])
                .ok_or_else(|| format!("{} is not in the list", args[1]))?;
            number(position as f64)
        }
        "slice" => {
            arity(3)?;
            let items = list(&args[0])?;
            let (start, end) = (num(1)? as usize, num(2)? as usize);
            if start > end || end > items.len() {
                return Err(format!("{start}..{end} is outside the list (length {})", items.len()));
            }
            Value::Array(items[start..end].to_vec())
        }
        "sort" => {
            arity(1)?;
            let mut items = list(&args[0])?.iter().map(text_of).collect::<Result<Vec<_>, _>>()?;
            items.sort();
            Value::Array(items.into_iter().map(Value::String).collect())
        }
        "zipmap" => {
            arity(2)?;
            let (keys, values) = (list(&args[0])?, list(&args[1])?);
            if keys.len() != values.len() {
                return Err(format!("{} keys and {} values", keys.len(), values.len()));
            }
            let mut map = Map::new();
            for (k, v) in keys.iter().zip(values) {
                map.insert(text_of(k)?, v.clone());
            }
            Value::Object(map)
        }
        "range" => {
            let (start, end, step) = match args.len() {
                1 => (0.0, num(0)?, 1.0),
                2 => (num(0)?, num(1)?, 1.0),
                3 => (num(0)?, num(1)?, num(2)?),
                n => return Err(format!("takes 1 to 3 arguments, not {n}")),
            };
            if step == 0.0 || (end - start) / step > 1024.0 {
                return Err("the range is empty-stepped or over 1024 long".into());
            }
            let mut out = Vec::new();
            let mut at = start;
            while (step > 0.0 && at < end) || (step < 0.0 && at > end) {
                out.push(number(at));
                at += step;
            }
            Value::Array(out)
        }
        "min" | "max" => {
            let values = args
                .iter()
                .map(|v| v.as_f64().ok_or_else(|| format!("{v} is not a number")))
                .collect::<Result<Vec<_>, _>>()?;
            let folded = values
                .iter()
                .copied()
                .reduce(if name == "min" { f64::min } else { f64::max })
                .ok_or("takes numbers")?;
            number(folded)
        }
        "abs" | "ceil" | "floor" | "signum" | "negate" | "int" => {
            arity(1)?;
            let n = num(0)?;
            number(match name {
                "abs" => n.abs(),
                "ceil" => n.ceil(),
                "floor" => n.floor(),
                "signum" => n.signum(),
                "negate" => -n,
                _ => n.trunc(),
            })
        }
        "pow" | "modulo" => {
            arity(2)?;
            let (a, b) = (num(0)?, num(1)?);
            if name == "modulo" && b == 0.0 {
                return Err("division by zero".into());
            }
            number(if name == "pow" { a.powf(b) } else { a % b })
        }
        "parseint" => {
            arity(2)?;
            let base = num(1)? as u32;
            if !(2..=36).contains(&base) {
                return Err(format!("base {base} is not 2 to 36"));
            }
            let s = text(0)?;
            number(i64::from_str_radix(&s, base).map_err(|e| format!("{s:?}: {e}"))? as f64)
        }
        "greaterthan" | "greaterthanorequalto" | "lessthan" | "lessthanorequalto" => {
            arity(2)?;
            let (a, b) = (num(0)?, num(1)?);
            Value::Bool(match name {
                "greaterthan" => a > b,
                "greaterthanorequalto" => a >= b,
                "lessthan" => a < b,
                _ => a <= b,
            })
        }
        "and" | "or" => {
            let values = args
                .iter()
                .map(|v| v.as_bool().ok_or_else(|| format!("{v} is not true or false")))
                .collect::<Result<Vec<_>, _>>()?;
            Value::Bool(if name == "and" { values.iter().all(|b| *b) } else { values.iter().any(|b| *b) })
        }
        "hasindex" => {
            arity(2)?;
            Value::Bool(match &args[0] {
                Value::Array(items) => args[1].as_u64().is_some_and(|i| (i as usize) < items.len()),
                Value::Object(map) => map.contains_key(&text(1)?),
                _ => false,
            })
        }
        "jsonencode" => {
            arity(1)?;
            Value::String(args[0].to_string())
        }
        "jsondecode" => {
            arity(1)?;
            serde_json::from_str(&text(0)?).map_err(|e| e.to_string())?
        }
        "urlencode" => {
            arity(1)?;
            let mut out = String::new();
            for byte in text(0)?.bytes() {
                match byte {
                    b'A'..=b'Z' | b'a'..=b'z' | b'0'..=b'9' | b'-' | b'_' | b'.' | b'~' => out.push(byte as char),
                    other => out.push_str(&format!("%{other:02X}")),
                }
            }
            Value::String(out)
        }
        "basename" | "dirname" => {
            arity(1)?;
            let path = text(0)?;
            let trimmed = path.trim_end_matches('/');
            let (dir, base) = match trimmed.rsplit_once('/') {
                Some(("", base)) => ("/", base),
                Some((dir, base)) => (dir, base),
                None if trimmed.is_empty() && path.starts_with('/') => ("/", "/"),
                None => (".", trimmed),
            };
            Value::String(if name == "basename" { base } else { dir }.to_string())
        }
        "base64encode" => {
            arity(1)?;
            use base64::Engine as _;
            Value::String(base64::engine::general_purpose::STANDARD.encode(text(0)?))
        }
        "base64decode" => {
            arity(1)?;
            use base64::Engine as _;
            let bytes = base64::engine::general_purpose::STANDARD.decode(text(0)?).map_err(|e| e.to_string())?;
            Value::String(String::from_utf8(bytes).map_err(|_| "the decoded bytes are not UTF-8".to_string())?)
        }
        "sha256" | "sha512" => {
            arity(1)?;
            use sha2::Digest as _;
            let input = text(0)?;
            Value::String(if name == "sha256" {
                hex::encode(sha2::Sha256::digest(input.as_bytes()))
            } else {
                hex::encode(sha2::Sha512::digest(input.as_bytes()))
            })
        }
        "regex_replace" => {
            arity(3)?;
            Value::String(pattern(&text(1)?)?.replace_all(&text(0)?, text(2)?.as_str()).into_owned())
        }
        "regex" | "regexall" => {
            arity(2)?;
            let (re, s) = (pattern(&text(0)?)?, text(1)?);
            // A match is its text, the list of its groups, or the map of its named groups.
            let matched = |captures: regex::Captures| -> Value {
                let names: Vec<&str> = re.capture_names().flatten().collect();
                if !names.is_empty() {
                    let map = names
                        .iter()
                        .map(|n| {
                            (n.to_string(), Value::String(captures.name(n).map_or("", |m| m.as_str()).to_string()))
                        })
                        .collect();
                    Value::Object(map)
                } else if captures.len() > 1 {
                    Value::Array(
                        captures
                            .iter()
                            .skip(1)
                            .map(|m| Value::String(m.map_or("", |m| m.as_str()).to_string()))
                            .collect(),
                    )
                } else {
                    Value::String(captures.get(0).map_or("", |m| m.as_str()).to_string())
                }
            };
            if name == "regex" {
                matched(re.captures(&s).ok_or_else(|| format!("no match of {} in {s:?}", re.as_str()))?)
            } else {
                Value::Array(re.captures_iter(&s).map(matched).collect())
            }
        }
        "md5" | "sha1" => {
            arity(1)?;
            let input = text(0)?;
            Value::String(if name == "md5" {
                use md5::Digest as _;
                hex::encode(md5::Md5::digest(input.as_bytes()))
            } else {
                use sha1::Digest as _;
                hex::encode(sha1::Sha1::digest(input.as_bytes()))
            })
        }
        "uuidv4" | "uuid" => {
            arity(0)?;
            Value::String(uuid::Uuid::new_v4().to_string())
        }
        "uuidv5" => {
            arity(2)?;
            let namespace = match text(0)?.as_str() {
                "dns" => uuid::Uuid::NAMESPACE_DNS,
                "url" => uuid::Uuid::NAMESPACE_URL,
                "oid" => uuid::Uuid::NAMESPACE_OID,
                "x500" => uuid::Uuid::NAMESPACE_X500,
                other => other.parse().map_err(|e| format!("namespace {other:?}: {e}"))?,
            };
            Value::String(uuid::Uuid::new_v5(&namespace, text(1)?.as_bytes()).to_string())
        }
        "timestamp" => {
            arity(0)?;
            Value::String(crate::dates::timestamp()?)
        }
        "formatdate" => {
            arity(2)?;
            Value::String(crate::dates::formatdate(&text(0)?, &text(1)?)?)
        }
        "timeadd" => {
            arity(2)?;
            Value::String(crate::dates::timeadd(&text(0)?, &text(1)?)?)
        }
        "setunion" | "setintersection" | "setsubtract" | "setsymmetricdifference" => {
            let sets = args.iter().map(|a| list(a)).collect::<Result<Vec<_>, _>>()?;
            let (first, rest) = sets.split_first().ok_or("takes at least one list")?;
            let mut out: Vec<Value> = Vec::new();
            let add = |v: &Value, out: &mut Vec<Value>| {
                if !out.contains(v) {
                    out.push(v.clone());
                }
            };
            match name {
                "setunion" => sets.iter().flat_map(|s| s.iter()).for_each(|v| add(v, &mut out)),
                "setintersection" => {
                    first.iter().filter(|v| rest.iter().all(|s| s.contains(v))).for_each(|v| add(v, &mut out))
                }
                "setsubtract" => {
                    arity(2)?;
                    first.iter().filter(|v| !rest[0].contains(v)).for_each(|v| add(v, &mut out))
                }
                _ => sets
                    .iter()
                    .flat_map(|s| s.iter())
                    .filter(|v| sets.iter().filter(|s| s.contains(v)).count() % 2 == 1)
                    .for_each(|v| add(v, &mut out)),
            }
            Value::Array(out)
        }
        "setproduct" => {
            let mut product: Vec<Vec<Value>> = vec![Vec::new()];
            for arg in &args {
                let items = list(arg)?;
                product = product
                    .iter()
                    .flat_map(|prefix| items.iter().map(move |item| [prefix.clone(), vec![item.clone()]].concat()))
                    .collect();
                if product.len() > 4096 {
                    return Err("more than 4096 combinations".into());
                }
            }
            Value::Array(if args.is_empty() { Vec::new() } else { product.into_iter().map(Value::Array).collect() })
        }
        "chunklist" => {
            arity(2)?;
            let items = list(&args[0])?;
            let size = args[1].as_f64().filter(|n| *n >= 0.0).ok_or("the size is not a number")?;
            match size as usize {
                0 => Value::Array(vec![Value::Array(items.clone())]),
                size => Value::Array(items.chunks(size).map(|c| Value::Array(c.to_vec())).collect()),
            }
        }
        "formatlist" => {
            let (spec, rest) = args.split_first().ok_or("takes a format")?;
            let spec = text_of(spec)?;
            let lengths: Vec<usize> = rest.iter().filter_map(|a| a.as_array().map(Vec::len)).collect();
            let n = lengths.first().copied().unwrap_or(1);
            if lengths.iter().any(|l| *l != n) {
                return Err("the lists differ in length".into());
            }
            let mut out = Vec::with_capacity(n);
            for i in 0..n {
                let row: Vec<Value> =
                    rest.iter().map(|a| a.as_array().map_or_else(|| a.clone(), |items| items[i].clone())).collect();
                out.push(Value::String(format_go(&spec, &row)?));
            }
            Value::Array(out)
        }
        "log" => {
            arity(2)?;
            let (Some(x), Some(base)) = (args[0].as_f64(), args[1].as_f64()) else {
                return Err("takes two numbers".into());
            };
            number(x.ln() / base.ln())
        }
        "byteslen" => {
            arity(1)?;
            number(text(0)?.len() as f64)
        }
        _ => return Err(format!("unknown function {name}()")),
    })
}

/// A regular expression (bounded in size: a bake file is input).
fn pattern(source: &str) -> Result<regex::Regex, String> {
    regex::RegexBuilder::new(source).size_limit(1 << 20).build().map_err(|e| format!("{source:?}: {e}"))
}

/// Go's `fmt.Sprintf` verbs bake files use: `%s`, `%d`, `%v`, `%q`, `%%`.
fn format_go(spec: &str, args: &[Value]) -> Result<String, String> {
    let mut out = String::new();
    let mut chars = spec.chars();
    let mut next = args.iter();
    while let Some(c) = chars.next() {
        if c != '%' {
            out.push(c);
            continue;
        }
        let verb = chars.next().ok_or("the format ends in %")?;
        if verb == '%' {
            out.push('%');
            continue;
        }
        let arg = next.next().ok_or_else(|| format!("%{verb} has no argument"))?;
        match verb {
            's' | 'v' => out.push_str(&text_of(arg).unwrap_or_else(|_| arg.to_string())),
            'd' => out.push_str(&(arg.as_f64().ok_or_else(|| format!("%d of {arg}"))? as i64).to_string()),
            'q' => out.push_str(&Value::String(text_of(arg)?).to_string()),
            other => return Err(format!("%{other} is not supported (%s, %d, %v, %q and %% are)")),
        }
    }
    Ok(out)
}

fn list(value: &Value) -> Result<&Vec<Value>, String> {
    value.as_array().ok_or_else(|| format!("{value} is not a list"))
}

fn object(value: &Value) -> Result<&Map<String, Value>, String> {
    value.as_object().ok_or_else(|| format!("{value} is not an object"))
}
