//! The CSV of The Things Stack's device template (ttscsv.go): a header row, `;` as separator
//! unless the header has none and has `,`, fields in double quotes may hold the separator,
//! line breaks and `""` for a quote; spaces before a field are dropped.

/// Rows of `text` (header first), each with the line it starts on.
pub(crate) fn parse(text: &str) -> Result<Vec<(usize, Vec<String>)>, String> {
    let text = text.trim_start_matches('\u{feff}');
    let header = text.lines().next().unwrap_or("");
    let sep = if !header.contains(';') && header.contains(',') {
        ','
    } else {
        ';'
    };
    let mut rows = Vec::new();
    let mut row = Vec::new();
    let mut field = String::new();
    let mut line = 1;
    let mut row_line = 1;
    let mut quoted = false;
    let mut at_field_start = true;
    let mut chars = text.chars().peekable();
    while let Some(c) = chars.next() {
        if quoted {
            match c {
                '"' if chars.peek() == Some(&'"') => {
                    chars.next();
                    field.push('"');
                }
                '"' => quoted = false,
                '\n' => {
                    line += 1;
                    field.push(c);
                }
                _ => field.push(c),
            }
            continue;
        }
        match c {
            '"' if at_field_start => {
                quoted = true;
                at_field_start = false;
            }
            ' ' | '\t' if at_field_start => {}
            c if c == sep => {
                row.push(std::mem::take(&mut field));
                at_field_start = true;
            }
            '\r' => {}
            '\n' => {
                row.push(std::mem::take(&mut field));
                if !(row.len() == 1 && row[0].is_empty()) {
                    rows.push((row_line, std::mem::take(&mut row)));
                }
                row.clear();
                line += 1;
                row_line = line;
                at_field_start = true;
            }
            _ => {
                field.push(c);
                at_field_start = false;
            }
        }
    }
    if quoted {
        return Err(format!("line {row_line}: a quoted field is not closed"));
    }
    if !field.is_empty() || !row.is_empty() {
        row.push(field);
        rows.push((row_line, row));
    }
    if let Some((_, header)) = rows.first() {
        let n = header.len();
        if let Some((l, r)) = rows.iter().find(|(_, r)| r.len() != n) {
            return Err(format!(
                "line {l}: {} fields, but the header has {n}",
                r.len()
            ));
        }
    }
    Ok(rows)
}
