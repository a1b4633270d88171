//! The CSV of The Things Stack's device template (ttscsv.go): a header row, `;` as separator
//! unless the header has none and has `,`; quoting as RFC 4180 (fields in double quotes may hold
//! the separator, line breaks and `""` for a quote); spaces around a field are dropped. Read with
//! the `csv` crate; every row must have as many fields as the header.

/// Rows of `text` (header first), each with the line it starts on.
pub(crate) fn parse(text: &str) -> Result<Vec<(usize, Vec<String>)>, String> {
    let text = text.trim_start_matches('\u{feff}');
    let header = text.lines().next().unwrap_or("");
    let sep = if !header.contains(';') && header.contains(',') {
        b','
    } else {
        b';'
    };
    let mut reader = ::csv::ReaderBuilder::new()
        .delimiter(sep)
        .has_headers(false)
        .trim(::csv::Trim::All)
        .from_reader(text.as_bytes());
    let mut rows = Vec::new();
    for record in reader.records() {
        let record = record.map_err(|e| match e.position() {
            Some(p) => format!("line {}: {}", p.line(), describe(&e)),
            None => describe(&e),
        })?;
        if record.len() == 1 && record[0].is_empty() {
            continue; // a blank line
        }
        let line = record.position().map_or(0, |p| p.line() as usize);
        rows.push((line, record.iter().map(str::to_string).collect()));
    }
    Ok(rows)
}

/// The csv crate's error without its position (given by the caller as "line N").
fn describe(e: &::csv::Error) -> String {
    match e.kind() {
        ::csv::ErrorKind::UnequalLengths {
            expected_len, len, ..
        } => format!("{len} fields, but the header has {expected_len}"),
        ::csv::ErrorKind::Utf8 { .. } => "not UTF-8 text".to_string(),
        _ => e.to_string(),
    }
}
