//! The `KEY=VALUE,...` specs of `--output`, `--cache-to`, `--cache-from` and `--secret`.

/// The comma-separated fields of a spec, read as one CSV record as buildx reads them, so a
/// value with a comma is quoted: `type=local,"dest=/srv/a,b"`. Fields are trimmed.
pub fn spec_fields(spec: &str) -> Result<Vec<String>, String> {
    let mut reader = csv::ReaderBuilder::new().has_headers(false).flexible(true).from_reader(spec.as_bytes());
    let mut records = reader.records();
    let fields = match records.next() {
        None => Vec::new(),
        Some(Ok(record)) => record.iter().map(|field| field.trim().to_string()).collect(),
        Some(Err(error)) => return Err(format!("not a comma-separated list: {error}")),
    };
    if records.next().is_some() {
        return Err("a spec is one line".to_string());
    }
    Ok(fields)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn fields_split_on_commas_outside_quotes() {
        assert_eq!(spec_fields("type=local, dest=/a").unwrap(), ["type=local", "dest=/a"]);
        assert_eq!(spec_fields(r#"type=local,"dest=/srv/a,b""#).unwrap(), ["type=local", "dest=/srv/a,b"]);
        assert_eq!(spec_fields(r#"type=local,"dest=/a ""q"" b""#).unwrap(), ["type=local", r#"dest=/a "q" b"#]);
        assert_eq!(spec_fields("").unwrap(), Vec::<String>::new());
        assert!(spec_fields("type=local\ndest=/a").is_err());
    }
}
