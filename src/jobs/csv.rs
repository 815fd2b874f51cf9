//! The CSV import pipeline as plain functions: validation, scanning, parsing, categorization.
//!
//! No actor, socket or database here; `job.rs` and `zone.rs` drive these steps and the row store
//! keeps their output (a [`Row`] is its type). Everything streams: a file is read zone by zone, never whole.

use std::fs::File;
use std::io::{BufReader, Seek, SeekFrom};
use std::path::Path;

use serde::{Deserialize, Serialize};

use crate::db::row_store::{fnv1a_128, Row};
use crate::protocol::{FlaggedCell, InvalidRow};

/// The columns a file must have (in any order, any letter case).
pub const REQUIRED_COLUMNS: [&str; 3] = ["date", "amount", "description"];

/// Where the required columns are.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub struct Columns {
    /// Index of `date`.
    pub date: usize,
    /// Index of `amount`.
    pub amount: usize,
    /// Index of `description`.
    pub description: usize,
}

/// Finds the required columns in a header, or names the missing ones.
pub fn parse_header(header: &[String]) -> Result<Columns, String> {
    let find =
        |name: &str| header.iter().position(|h| h.trim().trim_start_matches('\u{feff}').eq_ignore_ascii_case(name));
    let (date, amount, description) = (find("date"), find("amount"), find("description"));
    let missing: Vec<&str> = REQUIRED_COLUMNS
        .iter()
        .zip([date, amount, description])
        .filter(|(_, found)| found.is_none())
        .map(|(name, _)| *name)
        .collect();
    match (date, amount, description) {
        (Some(date), Some(amount), Some(description)) => Ok(Columns { date, amount, description }),
        _ => Err(format!(
            "the header lacks the column{} {}; it must have date, amount and description (found: {})",
            if missing.len() > 1 { "s" } else { "" },
            missing.join(", "),
            header.join(", ")
        )),
    }
}

/// Where a zone starts in the file.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub struct ZoneStart {
    /// Byte offset of the zone's first record.
    pub byte: u64,
    /// File line of the zone's first record (the header is line 1).
    pub line: u64,
    /// Records in the zone.
    pub rows: u64,
}

/// What validation learned about a file.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Validated {
    /// The required columns.
    pub columns: Columns,
    /// Data rows.
    pub rows: u64,
    /// The zones, in order.
    pub zones: Vec<ZoneStart>,
}

/// Validation: size, UTF-8, header; counts rows and cuts the file into zones of `zone_rows`.
/// `progress` is called now and then with (bytes read, bytes total).
pub fn validate(
    path: &Path,
    max_bytes: u64,
    zone_rows: usize,
    mut progress: impl FnMut(u64, u64),
) -> Result<Validated, String> {
    let file = File::open(path).map_err(|e| format!("cannot open the upload: {e}"))?;
    let size = file.metadata().map_err(|e| format!("cannot read the upload: {e}"))?.len();
    if size == 0 {
        return Err("the file is empty; expected a header with date, amount and description".into());
    }
    if size > max_bytes {
        return Err(format!("the file is {size} bytes; the limit is {max_bytes}"));
    }
    let mut reader = csv_reader(BufReader::with_capacity(1 << 16, file), true);
    let header = reader.byte_headers().map_err(|e| format!("cannot read the header: {e}"))?.clone();
    let header: Vec<String> = header
        .iter()
        .map(|f| std::str::from_utf8(f).map(str::to_string))
        .collect::<Result<_, _>>()
        .map_err(|_| "the header (line 1) is not valid UTF-8".to_string())?;
    let columns = parse_header(&header)?;
    let zone_rows = zone_rows.max(1) as u64;
    let mut record = csv::ByteRecord::new();
    let mut rows = 0u64;
    let mut zones: Vec<ZoneStart> = Vec::new();
    loop {
        let pos = reader.position().clone();
        match reader.read_byte_record(&mut record) {
            Ok(true) => {}
            Ok(false) => break,
            Err(e) => return Err(format!("unreadable CSV near line {}: {e}", pos.line())),
        }
        let line = record.position().map(|p| p.line()).unwrap_or(pos.line());
        if record.iter().any(|f| std::str::from_utf8(f).is_err()) {
            return Err(format!("line {line} is not valid UTF-8"));
        }
        if rows.is_multiple_of(zone_rows) {
            let byte = record.position().map(|p| p.byte()).unwrap_or(pos.byte());
            zones.push(ZoneStart { byte, line, rows: 0 });
        }
        if let Some(z) = zones.last_mut() {
            z.rows += 1;
        }
        rows += 1;
        if rows.is_multiple_of(65_536) {
            progress(reader.position().byte(), size);
        }
    }
    progress(size, size);
    Ok(Validated { columns, rows, zones })
}

fn csv_reader<R: std::io::Read>(r: R, has_headers: bool) -> csv::Reader<R> {
    csv::ReaderBuilder::new().has_headers(has_headers).flexible(true).from_reader(r)
}

/// Reads the records of one zone: `(file line, fields)` for each.
pub fn read_zone(path: &Path, zone: &ZoneStart) -> Result<Vec<(u64, Vec<String>)>, String> {
    let mut file = File::open(path).map_err(|e| format!("cannot open the upload: {e}"))?;
    file.seek(SeekFrom::Start(zone.byte)).map_err(|e| format!("cannot seek in the upload: {e}"))?;
    let mut reader = csv_reader(BufReader::with_capacity(1 << 16, file), false);
    let mut out = Vec::with_capacity(zone.rows as usize);
    let mut record = csv::StringRecord::new();
    while (out.len() as u64) < zone.rows {
        match reader.read_record(&mut record) {
            Ok(true) => {
                let line = zone.line + record.position().map(|p| p.line()).unwrap_or(1) - 1;
                out.push((line, record.iter().map(str::to_string).collect()));
            }
            Ok(false) => return Err(format!("the upload changed: zone at line {} ended early", zone.line)),
            Err(e) => return Err(format!("unreadable CSV in zone at line {}: {e}", zone.line)),
        }
    }
    Ok(out)
}

/// Why a cell was flagged by scanning.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum CellIssue {
    /// Starts like a spreadsheet formula (`=`, `+`, `-`, `@`, tab, CR) and is not a number.
    FormulaInjection,
    /// Holds control characters or NUL bytes.
    ControlCharacters,
}

impl CellIssue {
    /// The `reason` reported in `flagged_cells`.
    pub fn reason(self) -> &'static str {
        match self {
            CellIssue::FormulaInjection => "formula_injection",
            CellIssue::ControlCharacters => "control_characters",
        }
    }
}

/// Characters that start a spreadsheet formula, ASCII and full-width.
const FORMULA_STARTS: [char; 8] = ['=', '+', '-', '@', '\u{ff1d}', '\u{ff0b}', '\u{ff0d}', '\u{ff20}'];

/// Scanning: what is wrong with a cell, and the neutralised value to store instead.
pub fn scan_cell(cell: &str) -> (Vec<CellIssue>, Option<String>) {
    let mut issues = Vec::new();
    let mut value: Option<String> = None;
    if cell.chars().any(|c| c.is_control() && c != '\t') {
        issues.push(CellIssue::ControlCharacters);
        value = Some(cell.chars().filter(|c| !c.is_control() || *c == '\t').collect());
    }
    let current = value.as_deref().unwrap_or(cell);
    // Spreadsheets skip leading blanks (spaces, NBSP, ideographic space, tabs) before a formula and
    // read the full-width signs as the ASCII ones.
    let lead = current.trim_start_matches(|c: char| c.is_whitespace() || c == '\u{feff}');
    let starts_formula = current.starts_with(['\t', '\r']) || lead.starts_with(FORMULA_STARTS);
    if starts_formula && parse_amount(lead).is_none() {
        issues.push(CellIssue::FormulaInjection);
        value = Some(format!("'{current}"));
    }
    (issues, value)
}

/// Parses a date in a common format into `YYYY-MM-DD`.
///
/// Accepted: `2024-01-31`, `2024/01/31`, `2024-01-31T10:00:00[Z]`, `31.01.2024`, `01/31/2024` (US; when
/// the first part is above 12 it is read as `31/01/2024`), `20240131`, `Jan 31 2024`, `31 Jan 2024`,
/// `January 31, 2024`.
pub fn parse_date(s: &str) -> Option<String> {
    let s = s.trim();
    let s = s
        .split(['T', ' '])
        .next()
        .filter(|p| p.len() >= 8 && p.chars().any(|c| c == '-' || c == '/' || c == '.'))
        .unwrap_or(s);
    let num = |p: &str| -> Option<u32> {
        (!p.is_empty() && p.len() <= 4 && p.bytes().all(|b| b.is_ascii_digit())).then(|| p.parse().ok()).flatten()
    };
    let (y, m, d) = if s.len() == 8 && s.bytes().all(|b| b.is_ascii_digit()) {
        (num(&s[..4])?, num(&s[4..6])?, num(&s[6..])?)
    } else if let Some(parts) = split3(s, &['-', '/', '.']) {
        let (a, b, c) = parts;
        let sep_dot = s.contains('.');
        if a.len() == 4 {
            (num(a)?, num(b)?, num(c)?)
        } else if c.len() == 4 {
            let (a, b, c) = (num(a)?, num(b)?, num(c)?);
            if sep_dot || a > 12 {
                (c, b, a)
            } else {
                (c, a, b)
            }
        } else {
            return None;
        }
    } else {
        parse_month_name(s)?
    };
    valid_ymd(y, m, d).then(|| format!("{y:04}-{m:02}-{d:02}"))
}

fn split3<'a>(s: &'a str, seps: &[char]) -> Option<(&'a str, &'a str, &'a str)> {
    let sep = seps.iter().find(|c| s.contains(**c))?;
    let mut it = s.split(*sep);
    let parts = (it.next()?, it.next()?, it.next()?);
    it.next().is_none().then_some(parts)
}

fn parse_month_name(s: &str) -> Option<(u32, u32, u32)> {
    const MONTHS: [&str; 12] = ["jan", "feb", "mar", "apr", "may", "jun", "jul", "aug", "sep", "oct", "nov", "dec"];
    let words: Vec<&str> = s.split([' ', ',']).filter(|w| !w.is_empty()).collect();
    if words.len() != 3 {
        return None;
    }
    let month_of = |w: &str| {
        let w = w.to_ascii_lowercase();
        MONTHS.iter().position(|m| w.len() >= 3 && w.starts_with(m)).map(|i| i as u32 + 1)
    };
    let n = |w: &str| w.parse::<u32>().ok();
    match (month_of(words[0]), month_of(words[1])) {
        (Some(m), None) => Some((n(words[2])?, m, n(words[1])?)),
        (None, Some(m)) => Some((n(words[2])?, m, n(words[0])?)),
        _ => None,
    }
}

fn valid_ymd(y: u32, m: u32, d: u32) -> bool {
    let leap = (y.is_multiple_of(4) && !y.is_multiple_of(100)) || y.is_multiple_of(400);
    let days = match m {
        1 | 3 | 5 | 7 | 8 | 10 | 12 => 31,
        4 | 6 | 9 | 11 => 30,
        2 if leap => 29,
        2 => 28,
        _ => return false,
    };
    (1000..=9999).contains(&y) && d >= 1 && d <= days
}

/// Parses a decimal amount into cents: `12.50`, `-12.5`, `+3`, `1,234.56`, `1.234,56`, `(12.50)`,
/// `$12.50`, `12.50 EUR`. More than two decimals, or anything else, is refused.
pub fn parse_amount(s: &str) -> Option<i64> {
    let mut t = s.trim();
    let mut negative = false;
    if t.starts_with('(') && t.ends_with(')') {
        negative = true;
        t = &t[1..t.len() - 1];
    }
    let t = t.trim_matches(|c: char| c.is_alphabetic() || matches!(c, '$' | '€' | '£' | '¥' | ' '));
    let t = match t.strip_prefix('-') {
        Some(rest) => {
            negative = !negative;
            rest
        }
        None => t.strip_prefix('+').unwrap_or(t),
    };
    let t = t.trim_start_matches(['$', '€', '£', '¥']);
    if t.is_empty() || !t.bytes().all(|b| b.is_ascii_digit() || b == b'.' || b == b',') {
        return None;
    }
    // The last separator is the decimal one when 1-2 digits follow it; a comma followed by exactly
    // three digits is a thousands separator. Other separators must group the integer part by three.
    let last_sep = t.rfind(['.', ',']);
    let (int_part, frac_part, decimal_sep) = match last_sep {
        Some(i) if (2..=3).contains(&(t.len() - i)) => (&t[..i], &t[i + 1..], Some(t.as_bytes()[i])),
        Some(i) if t.len() - i == 4 && t.as_bytes()[i] == b',' => (t, "", None),
        None => (t, "", None),
        _ => return None,
    };
    let mut groups = int_part.split([',', '.']);
    let first = groups.next().unwrap_or("");
    if int_part.contains(['.', ',']) {
        let thousands = int_part.bytes().find(|b| *b == b'.' || *b == b',');
        if thousands == decimal_sep || first.is_empty() || first.len() > 3 || groups.any(|g| g.len() != 3) {
            return None;
        }
        if int_part.bytes().filter(|b| *b == b'.' || *b == b',').any(|b| Some(b) != thousands) {
            return None;
        }
    }
    let int_digits: String = int_part.chars().filter(|c| c.is_ascii_digit()).collect();
    if int_digits.is_empty() && frac_part.is_empty() {
        return None;
    }
    if int_digits.len() > 15 {
        return None;
    }
    let int: i64 = if int_digits.is_empty() { 0 } else { int_digits.parse().ok()? };
    let frac: i64 = match frac_part.len() {
        0 => 0,
        1 => frac_part.parse::<i64>().ok()? * 10,
        _ => frac_part.parse().ok()?,
    };
    let cents = int * 100 + frac;
    Some(if negative { -cents } else { cents })
}

/// Rule-based categorization: the first category one of whose keywords occurs in the description.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Rules {
    /// `(category, keywords)` in priority order; keywords are matched lower-case as substrings.
    pub rules: Vec<(String, Vec<String>)>,
}

impl Default for Rules {
    fn default() -> Self {
        let r = |c: &str, kw: &[&str]| (c.to_string(), kw.iter().map(|k| k.to_string()).collect());
        Rules {
            rules: vec![
                r("income", &["salary", "payroll", "paycheck", "dividend", "refund", "interest paid"]),
                r("rent", &["rent", "mortgage", "landlord"]),
                r(
                    "groceries",
                    &[
                        "grocery",
                        "groceries",
                        "supermarket",
                        "whole foods",
                        "trader joe",
                        "aldi",
                        "lidl",
                        "tesco",
                        "safeway",
                        "kroger",
                    ],
                ),
                r(
                    "dining",
                    &[
                        "restaurant",
                        "cafe",
                        "coffee",
                        "starbucks",
                        "pizza",
                        "burger",
                        "mcdonald",
                        "doordash",
                        "ubereats",
                        "uber eats",
                        "bar ",
                    ],
                ),
                r(
                    "transport",
                    &[
                        "uber",
                        "lyft",
                        "taxi",
                        "fuel",
                        "gas station",
                        "shell",
                        "parking",
                        "train",
                        "metro",
                        "airline",
                        "flight",
                    ],
                ),
                r(
                    "utilities",
                    &["electric", "water bill", "internet", "phone", "mobile", "utility", "comcast", "verizon"],
                ),
                r("entertainment", &["netflix", "spotify", "cinema", "movie", "steam", "concert", "hulu", "disney"]),
                r("shopping", &["amazon", "ebay", "store", "shop", "ikea", "target", "walmart"]),
                r("health", &["pharmacy", "doctor", "dental", "hospital", "clinic", "gym"]),
            ],
        }
    }
}

impl Rules {
    /// Reads rules from a TOML file of `category = ["keyword", ...]` tables, in file order.
    pub fn from_toml(text: &str) -> Result<Rules, String> {
        let table: toml::Table = toml::from_str(text).map_err(|e| format!("rules file: {e}"))?;
        let mut rules = Vec::new();
        for (category, v) in table {
            let words = v
                .as_array()
                .ok_or_else(|| format!("rules file: {category} must be a list of keywords"))?
                .iter()
                .map(|w| {
                    w.as_str()
                        .map(|s| s.to_lowercase())
                        .ok_or_else(|| format!("rules file: {category} has a non-string keyword"))
                })
                .collect::<Result<Vec<_>, _>>()?;
            rules.push((category, words));
        }
        Ok(Rules { rules })
    }

    /// The category of a row.
    pub fn categorize(&self, description: &str, cents: i64) -> &str {
        let d = description.to_lowercase();
        for (category, words) in &self.rules {
            if words.iter().any(|w| d.contains(w.as_str())) {
                return category;
            }
        }
        if cents > 0 {
            "income"
        } else {
            "uncategorized"
        }
    }
}

/// What scanning, parsing and categorization make of one zone's records.
#[derive(Debug, Default)]
pub struct ZoneRows {
    /// Valid rows.
    pub rows: Vec<Row>,
    /// Refused rows (all of them; the job keeps the first 100).
    pub invalid: Vec<InvalidRow>,
    /// Flagged cells (all of them; the job keeps the first 100).
    pub flagged: Vec<FlaggedCell>,
}

/// The deduplication key of a row: FNV-1a (128 bit) over date, amount and normalised description.
/// A collision needs about 2^64 distinct rows, so equal keys mean equal rows.
pub fn content_key(date: &str, cents: i64, normalised_description: &str) -> [u8; 16] {
    fnv1a_128(&[date.as_bytes(), b"|", &cents.to_le_bytes(), b"|", normalised_description.as_bytes()]).to_be_bytes()
}

/// Scans, parses and categorizes one zone's records.
pub fn process_records(records: Vec<(u64, Vec<String>)>, columns: &Columns, rules: &Rules) -> ZoneRows {
    let mut out = ZoneRows { rows: Vec::with_capacity(records.len()), ..Default::default() };
    let names = ["date", "amount", "description"];
    for (line, mut fields) in records {
        // Scanning: every cell, neutralised in place.
        for (i, cell) in fields.iter_mut().enumerate() {
            let (issues, fixed) = scan_cell(cell);
            for issue in issues {
                let column = [columns.date, columns.amount, columns.description]
                    .iter()
                    .position(|c| *c == i)
                    .map(|k| names[k].to_string())
                    .unwrap_or_else(|| format!("column {}", i + 1));
                out.flagged.push(FlaggedCell { line, column, reason: issue.reason().into() });
            }
            if let Some(fixed) = fixed {
                *cell = fixed;
            }
        }
        // Parsing.
        let get = |i: usize| fields.get(i).map(|s| s.trim()).unwrap_or("");
        let max_col = columns.date.max(columns.amount).max(columns.description);
        if fields.len() <= max_col {
            out.invalid.push(InvalidRow {
                line,
                reason: format!("expected at least {} fields, found {}", max_col + 1, fields.len()),
            });
            continue;
        }
        let Some(date) = parse_date(get(columns.date)) else {
            out.invalid.push(InvalidRow { line, reason: format!("invalid date {:?}", get(columns.date)) });
            continue;
        };
        let Some(cents) = parse_amount(get(columns.amount)) else {
            out.invalid.push(InvalidRow { line, reason: format!("invalid amount {:?}", get(columns.amount)) });
            continue;
        };
        let description = get(columns.description).to_string();
        if description.is_empty() {
            out.invalid.push(InvalidRow { line, reason: "empty description".into() });
            continue;
        }
        let normalised = description.split_whitespace().collect::<Vec<_>>().join(" ").to_lowercase();
        let key = content_key(&date, cents, &normalised);
        let category = rules.categorize(&description, cents).to_string();
        out.rows.push(Row { line, date, cents, description, category, key });
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::io::Write;

    #[test]
    fn header_names_what_is_missing() {
        let h = |s: &str| s.split(',').map(str::to_string).collect::<Vec<_>>();
        assert_eq!(
            parse_header(&h("Date,Amount,Description")).unwrap(),
            Columns { date: 0, amount: 1, description: 2 }
        );
        assert_eq!(
            parse_header(&h("memo, description ,AMOUNT,date")).unwrap(),
            Columns { date: 3, amount: 2, description: 1 }
        );
        let err = parse_header(&h("date,value,memo")).unwrap_err();
        assert!(err.contains("lacks the columns amount, description"), "{err}");
        assert!(parse_header(&h("\u{feff}date,amount,description")).is_ok(), "a UTF-8 BOM is tolerated");
    }

    #[test]
    fn dates_in_common_formats() {
        for (input, want) in [
            ("2024-01-31", "2024-01-31"),
            ("2024/1/5", "2024-01-05"),
            ("2024-01-31T10:00:00Z", "2024-01-31"),
            ("31.01.2024", "2024-01-31"),
            ("01/31/2024", "2024-01-31"),
            ("31/01/2024", "2024-01-31"),
            ("20240131", "2024-01-31"),
            ("Jan 31 2024", "2024-01-31"),
            ("31 January 2024", "2024-01-31"),
            ("January 31, 2024", "2024-01-31"),
            ("2024-02-29", "2024-02-29"),
        ] {
            assert_eq!(parse_date(input).as_deref(), Some(want), "{input}");
        }
        for bad in ["2023-02-29", "2024-13-01", "yesterday", "", "31/31/2024", "2024-01", "1/2/3"] {
            assert_eq!(parse_date(bad), None, "{bad}");
        }
    }

    #[test]
    fn amounts_as_cents() {
        for (input, want) in [
            ("12.50", 1250),
            ("-12.5", -1250),
            ("+3", 300),
            ("1,234.56", 123_456),
            ("1.234,56", 123_456),
            ("(12.50)", -1250),
            ("$12.50", 1250),
            ("-$7.05", -705),
            ("12.50 EUR", 1250),
            ("0.99", 99),
            ("1,000", 100_000),
        ] {
            assert_eq!(parse_amount(input), Some(want), "{input}");
        }
        for bad in ["", "abc", "12.345.6x", "1.2.3", "12.505", "=1+2", "--5"] {
            assert_eq!(parse_amount(bad), None, "{bad}");
        }
    }

    #[test]
    fn formula_injection_is_flagged_and_neutralised() {
        assert_eq!(
            scan_cell("=HYPERLINK(\"x\")"),
            (vec![CellIssue::FormulaInjection], Some("'=HYPERLINK(\"x\")".into()))
        );
        assert_eq!(scan_cell("@SUM(A1)").0, vec![CellIssue::FormulaInjection]);
        assert_eq!(scan_cell("+cmd|' /C calc'!A0").0, vec![CellIssue::FormulaInjection]);
        assert_eq!(scan_cell("-12.50"), (vec![], None), "a negative number is not a formula");
        assert_eq!(scan_cell("coffee"), (vec![], None));
        for hidden in [
            " =1+1",
            "\u{a0}=HYPERLINK(\"x\")",
            "\u{3000}+cmd",
            "  @SUM(A1)",
            "\u{feff}=1",
            "\u{ff1d}HYPERLINK(\"x\")",
            "\u{ff0b}cmd",
            "\u{ff0d}cmd",
            "\u{ff20}SUM(A1)",
            " \u{ff1d}1",
        ] {
            let (issues, fixed) = scan_cell(hidden);
            assert_eq!(issues, vec![CellIssue::FormulaInjection], "{hidden:?}");
            assert_eq!(fixed, Some(format!("'{hidden}")), "{hidden:?}");
        }
        assert_eq!(scan_cell(" -12.50"), (vec![], None), "a negative number after a space is not a formula");
        assert_eq!(scan_cell("a = b"), (vec![], None), "a sign inside the text is no formula");
        let (issues, fixed) = scan_cell("bad\u{0}byte\u{7}");
        assert_eq!(issues, vec![CellIssue::ControlCharacters]);
        assert_eq!(fixed.as_deref(), Some("badbyte"));
    }

    #[test]
    fn categories_from_rules_with_defaults() {
        let rules = Rules::default();
        assert_eq!(rules.categorize("WHOLE FOODS #123", -4500), "groceries");
        assert_eq!(rules.categorize("Uber trip", -1200), "transport");
        assert_eq!(rules.categorize("ACME payroll", 250_000), "income");
        assert_eq!(rules.categorize("mystery", -100), "uncategorized");
        let custom = Rules::from_toml("pets = [\"vet\", \"petco\"]\n").unwrap();
        assert_eq!(custom.categorize("City Vet", -100), "pets");
        assert!(Rules::from_toml("pets = 3").is_err());
        let ordered = Rules::from_toml("zoo = [\"vet\"]\nanimals = [\"vet\"]\n").unwrap();
        assert_eq!(ordered.categorize("vet", -1), "zoo", "the first rule in the file wins");
    }

    #[test]
    fn validation_cuts_zones_and_zones_read_back_with_file_lines() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("a.csv");
        let mut f = File::create(&path).unwrap();
        writeln!(f, "date,amount,description").unwrap();
        for i in 0..5 {
            writeln!(f, "2024-01-0{},{}.00,\"item\n{i}\"", i + 1, i).unwrap(); // two file lines each
        }
        drop(f);
        let v = validate(&path, 1 << 20, 2, |_, _| {}).unwrap();
        assert_eq!(v.rows, 5);
        assert_eq!(v.zones.iter().map(|z| (z.line, z.rows)).collect::<Vec<_>>(), vec![(2, 2), (6, 2), (10, 1)]);
        let zone = read_zone(&path, &v.zones[1]).unwrap();
        assert_eq!(zone.iter().map(|(l, _)| *l).collect::<Vec<_>>(), vec![6, 8]);
        assert_eq!(zone[0].1[2], "item\n2");
    }

    #[test]
    fn validation_refuses_what_is_not_importable() {
        let dir = tempfile::tempdir().unwrap();
        let check = |name: &str, content: &[u8]| {
            let p = dir.path().join(name);
            std::fs::write(&p, content).unwrap();
            validate(&p, 1 << 20, 10, |_, _| {}).unwrap_err()
        };
        assert!(check("empty.csv", b"").contains("empty"));
        assert!(check("header.csv", b"when,how much\n").contains("lacks the columns"));
        assert!(check("latin1.csv", b"date,amount,description\n2024-01-01,1,caf\xe9\n")
            .contains("line 2 is not valid UTF-8"));
        let p = dir.path().join("big.csv");
        std::fs::write(&p, b"date,amount,description\n").unwrap();
        assert!(validate(&p, 4, 10, |_, _| {}).unwrap_err().contains("limit"));
    }

    #[test]
    fn records_become_rows_or_errors_with_lines() {
        let cols = Columns { date: 0, amount: 1, description: 2 };
        let rec = |line, f: &[&str]| (line, f.iter().map(|s| s.to_string()).collect::<Vec<_>>());
        let out = process_records(
            vec![
                rec(2, &["2024-01-01", "-4.50", "Starbucks"]),
                rec(3, &["nope", "1", "x"]),
                rec(4, &["2024-01-01", "abc", "x"]),
                rec(5, &["2024-01-01", "1"]),
                rec(6, &["2024-01-02", "10", "=cmd()"]),
            ],
            &cols,
            &Rules::default(),
        );
        assert_eq!(out.rows.len(), 2);
        assert_eq!(out.rows[0].category, "dining");
        assert_eq!(out.rows[1].description, "'=cmd()");
        assert_eq!(out.rows[0].key, content_key("2024-01-01", -450, "starbucks"));
        assert_ne!(content_key("2024-01-01", 1, "a"), content_key("2024-01-01", 1, "b"));
        assert_eq!(out.invalid.iter().map(|r| r.line).collect::<Vec<_>>(), vec![3, 4, 5]);
        assert_eq!(
            out.flagged,
            vec![FlaggedCell { line: 6, column: "description".into(), reason: "formula_injection".into() }]
        );
    }
}
