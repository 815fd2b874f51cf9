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

/// The most fields one record (the header included) may have.
pub const MAX_FIELDS: usize = 1024;
/// The most bytes one field may have.
pub const MAX_FIELD_BYTES: usize = 64 * 1024;
/// The most bytes one record (the header included) may have.
pub const MAX_RECORD_BYTES: usize = 256 * 1024;
/// A zone is cut after `zone_rows` records or once its records pass this many bytes.
pub const ZONE_BYTES: u64 = 8 << 20;
/// Refused rows and flagged cells kept per zone (all are counted).
pub const KEEP_PER_ZONE: usize = 100;

/// Which bound of a record a file broke, with the line it began on.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum TooLarge {
    /// More than [`MAX_FIELDS`] fields.
    Fields(u64),
    /// A field of more than [`MAX_FIELD_BYTES`].
    Field(u64),
    /// More than [`MAX_RECORD_BYTES`].
    Record(u64),
}

impl std::fmt::Display for TooLarge {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            TooLarge::Fields(line) => write!(f, "line {line} has more than {MAX_FIELDS} fields"),
            TooLarge::Field(line) => write!(f, "line {line} has a field of more than {MAX_FIELD_BYTES} bytes"),
            TooLarge::Record(line) => write!(f, "line {line} is longer than {MAX_RECORD_BYTES} bytes"),
        }
    }
}

/// Where the checker is in the CSV grammar, as csv-core reads it: a `"` opens a quoted field only
/// at the start of a field; inside a quoted field `""` is a quote; after the closing quote the field
/// goes on unquoted.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum At {
    FieldStart,
    Unquoted,
    Quoted,
    QuoteInQuoted,
}

/// Reads a CSV file for the parser while checking, byte by byte, that no record has more than
/// [`MAX_FIELDS`] fields, no field more than [`MAX_FIELD_BYTES`] and no record more than
/// [`MAX_RECORD_BYTES`], so the parser never holds an oversized record: the read fails at the
/// byte that breaks a bound. It follows quotes and record ends (`\n`, `\r`) as the parser does.
pub struct Bounded<R> {
    inner: R,
    at: At,
    fields: usize,
    field_bytes: usize,
    record_bytes: usize,
    /// The file line the current record began on, and the current line.
    record_line: u64,
    line: u64,
    /// The bounds: fields per record, bytes per field, bytes per record.
    limits: (usize, usize, usize),
    /// The bound broken, once one is.
    pub broken: Option<TooLarge>,
}

impl<R> Bounded<R> {
    /// Checks `inner`, whose first byte is at file line `line`.
    pub fn new(inner: R, line: u64) -> Self {
        Self::with_limits(inner, line, (MAX_FIELDS, MAX_FIELD_BYTES, MAX_RECORD_BYTES))
    }

    /// As [`Bounded::new`], with other bounds (tests use small ones).
    fn with_limits(inner: R, line: u64, limits: (usize, usize, usize)) -> Self {
        Bounded {
            inner,
            limits,
            at: At::FieldStart,
            fields: 1,
            field_bytes: 0,
            record_bytes: 0,
            record_line: line,
            line,
            broken: None,
        }
    }

    fn check(&mut self, bytes: &[u8]) -> Option<TooLarge> {
        for &b in bytes {
            if b == b'\n' {
                self.line += 1;
            }
            let quoted = matches!(self.at, At::Quoted);
            match b {
                b'\n' | b'\r' if !quoted => {
                    (self.at, self.fields, self.field_bytes, self.record_bytes) = (At::FieldStart, 1, 0, 0);
                    self.record_line = self.line;
                    continue;
                }
                b',' if !quoted => {
                    self.at = At::FieldStart;
                    self.fields += 1;
                    self.field_bytes = 0;
                }
                b'"' => {
                    self.at = match self.at {
                        At::FieldStart => At::Quoted,
                        At::Quoted => At::QuoteInQuoted,
                        At::QuoteInQuoted => At::Quoted,
                        At::Unquoted => At::Unquoted,
                    };
                }
                _ => {
                    if matches!(self.at, At::FieldStart | At::QuoteInQuoted) {
                        self.at = At::Unquoted;
                    }
                }
            }
            self.record_bytes += 1;
            self.field_bytes += 1;
            let (max_fields, max_field, max_record) = self.limits;
            if self.fields > max_fields {
                return Some(TooLarge::Fields(self.record_line));
            }
            if self.field_bytes > max_field {
                return Some(TooLarge::Field(self.record_line));
            }
            if self.record_bytes > max_record {
                return Some(TooLarge::Record(self.record_line));
            }
        }
        None
    }
}

impl<R: std::io::Read> std::io::Read for Bounded<R> {
    fn read(&mut self, buf: &mut [u8]) -> std::io::Result<usize> {
        if let Some(b) = self.broken {
            return Err(std::io::Error::new(std::io::ErrorKind::InvalidData, b.to_string()));
        }
        let n = self.inner.read(buf)?;
        if let Some(b) = self.check(&buf[..n]) {
            self.broken = Some(b);
            return Err(std::io::Error::new(std::io::ErrorKind::InvalidData, b.to_string()));
        }
        Ok(n)
    }
}

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
            crate::protocol::excerpt(&header.join(", "))
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
    /// Bytes of the zone's records (0 in snapshots written before zones were budgeted by bytes).
    #[serde(default)]
    pub bytes: u64,
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
    let mut reader = csv_reader(Bounded::new(BufReader::with_capacity(1 << 16, file), 1), true);
    let broken = |reader: &csv::Reader<Bounded<BufReader<File>>>| reader.get_ref().broken.map(|b| b.to_string());
    let header = match reader.byte_headers() {
        Ok(h) => h.clone(),
        Err(e) => return Err(broken(&reader).unwrap_or_else(|| format!("cannot read the header: {e}"))),
    };
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
            Err(e) => {
                return Err(broken(&reader).unwrap_or_else(|| format!("unreadable CSV near line {}: {e}", pos.line())))
            }
        }
        let line = record.position().map(|p| p.line()).unwrap_or(pos.line());
        if record.iter().any(|f| std::str::from_utf8(f).is_err()) {
            return Err(format!("line {line} is not valid UTF-8"));
        }
        let byte = record.position().map(|p| p.byte()).unwrap_or(pos.byte());
        let full = zones.last().is_none_or(|z| z.rows >= zone_rows || byte - z.byte >= ZONE_BYTES);
        if full {
            if let Some(z) = zones.last_mut() {
                z.bytes = byte - z.byte;
            }
            zones.push(ZoneStart { byte, line, rows: 0, bytes: 0 });
        }
        if let Some(z) = zones.last_mut() {
            z.rows += 1;
        }
        rows += 1;
        if rows.is_multiple_of(65_536) {
            progress(reader.position().byte(), size);
        }
    }
    if let Some(z) = zones.last_mut() {
        z.bytes = reader.position().byte() - z.byte;
    }
    progress(size, size);
    Ok(Validated { columns, rows, zones })
}

fn csv_reader<R: std::io::Read>(r: R, has_headers: bool) -> csv::Reader<R> {
    csv::ReaderBuilder::new().has_headers(has_headers).flexible(true).from_reader(r)
}

/// One record of a zone as the pipeline needs it: its line, how many fields it had, and the cells
/// of the three required columns (empty where the record is too short).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Record {
    /// File line the record begins on.
    pub line: u64,
    /// Fields the record had.
    pub fields: usize,
    /// `date`, `amount` and `description`, in that order.
    pub cells: [String; 3],
}

/// Reads the records of one zone, keeping only the required columns (the other fields are skipped
/// as bytes, never copied into strings).
pub fn read_zone(path: &Path, zone: &ZoneStart, columns: &Columns) -> Result<Vec<Record>, String> {
    let mut file = File::open(path).map_err(|e| format!("cannot open the upload: {e}"))?;
    file.seek(SeekFrom::Start(zone.byte)).map_err(|e| format!("cannot seek in the upload: {e}"))?;
    let mut reader = csv_reader(Bounded::new(BufReader::with_capacity(1 << 16, file), zone.line), false);
    let mut out = Vec::with_capacity(zone.rows as usize);
    let mut record = csv::ByteRecord::new();
    let wanted = [columns.date, columns.amount, columns.description];
    while (out.len() as u64) < zone.rows {
        match reader.read_byte_record(&mut record) {
            Ok(true) => {
                let line = zone.line + record.position().map(|p| p.line()).unwrap_or(1) - 1;
                let cell = |i: usize| -> Result<String, String> {
                    let bytes = record.get(i).unwrap_or_default();
                    std::str::from_utf8(bytes)
                        .map(str::to_string)
                        .map_err(|_| format!("line {line} is not valid UTF-8"))
                };
                let cells = [cell(wanted[0])?, cell(wanted[1])?, cell(wanted[2])?];
                out.push(Record { line, fields: record.len(), cells });
            }
            Ok(false) => return Err(format!("the upload changed: zone at line {} ended early", zone.line)),
            Err(e) => {
                return Err(match reader.get_ref().broken {
                    Some(b) => b.to_string(),
                    None => format!("unreadable CSV in zone at line {}: {e}", zone.line),
                })
            }
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
    /// The first [`KEEP_PER_ZONE`] refused rows.
    pub invalid: Vec<InvalidRow>,
    /// Refused rows, all of them.
    pub invalid_count: u64,
    /// The first [`KEEP_PER_ZONE`] flagged cells.
    pub flagged: Vec<FlaggedCell>,
    /// Flagged cells, all of them.
    pub flagged_count: u64,
}

impl ZoneRows {
    fn refuse(&mut self, line: u64, reason: String) {
        self.invalid_count += 1;
        if self.invalid.len() < KEEP_PER_ZONE {
            self.invalid.push(InvalidRow { line, reason });
        }
    }

    fn flag(&mut self, line: u64, column: &str, issue: CellIssue) {
        self.flagged_count += 1;
        if self.flagged.len() < KEEP_PER_ZONE {
            self.flagged.push(FlaggedCell { line, column: column.into(), reason: issue.reason().into() });
        }
    }
}

/// The deduplication key of a row: FNV-1a (128 bit) over date, amount and normalised description.
/// A collision needs about 2^64 distinct rows, so equal keys mean equal rows.
pub fn content_key(date: &str, cents: i64, normalised_description: &str) -> [u8; 16] {
    fnv1a_128(&[date.as_bytes(), b"|", &cents.to_le_bytes(), b"|", normalised_description.as_bytes()]).to_be_bytes()
}

/// Scans, parses and categorizes one zone's records. Refused rows and flagged cells are counted,
/// and only the first [`KEEP_PER_ZONE`] of each kept; quoted input is cut to an excerpt.
pub fn process_records(records: Vec<Record>, columns: &Columns, rules: &Rules) -> ZoneRows {
    use crate::protocol::excerpt;
    let mut out = ZoneRows { rows: Vec::with_capacity(records.len()), ..Default::default() };
    let names = ["date", "amount", "description"];
    let needed = columns.date.max(columns.amount).max(columns.description) + 1;
    for Record { line, fields, mut cells } in records {
        // Scanning: every cell kept, neutralised in place.
        if fields >= needed {
            for (k, cell) in cells.iter_mut().enumerate() {
                let (issues, fixed) = scan_cell(cell);
                for issue in issues {
                    out.flag(line, names[k], issue);
                }
                if let Some(fixed) = fixed {
                    *cell = fixed;
                }
            }
        }
        // Parsing.
        if fields < needed {
            out.refuse(line, format!("expected at least {needed} fields, found {fields}"));
            continue;
        }
        let [date, amount, description] = cells.each_ref().map(|c| c.trim());
        let Some(date) = parse_date(date) else {
            out.refuse(line, format!("invalid date \"{}\"", excerpt(date)));
            continue;
        };
        let Some(cents) = parse_amount(amount) else {
            out.refuse(line, format!("invalid amount \"{}\"", excerpt(amount)));
            continue;
        };
        let description = description.to_string();
        if description.is_empty() {
            out.refuse(line, "empty description".into());
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
        let zone = read_zone(&path, &v.zones[1], &v.columns).unwrap();
        assert_eq!(zone.iter().map(|r| r.line).collect::<Vec<_>>(), vec![6, 8]);
        assert_eq!(zone[0].cells[2], "item\n2");
        assert_eq!(zone[0].fields, 3);
        assert_eq!(v.zones.iter().map(|z| z.bytes).sum::<u64>(), std::fs::metadata(&path).unwrap().len() - 24);
    }

    #[test]
    fn zones_are_cut_by_bytes_too() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("wide.csv");
        let mut f = std::io::BufWriter::new(File::create(&path).unwrap());
        writeln!(f, "date,amount,description").unwrap();
        let long = "d".repeat(60_000);
        // 300 rows of ~60 KB: 18 MB, one zone by rows, three by bytes.
        for _ in 0..300 {
            writeln!(f, "2024-01-01,1.00,{long}").unwrap();
        }
        drop(f);
        let v = validate(&path, 1 << 30, 1000, |_, _| {}).unwrap();
        assert_eq!(v.zones.len(), 3, "{:?}", v.zones);
        assert!(v.zones.iter().all(|z| z.bytes <= ZONE_BYTES + 60_100), "{:?}", v.zones);
        assert_eq!(v.zones.iter().map(|z| z.rows).sum::<u64>(), 300);
    }

    #[test]
    fn records_past_the_bounds_fail_validation_at_their_line_without_reading_them_whole() {
        let dir = tempfile::tempdir().unwrap();
        let check = |name: &str, content: &[u8]| {
            let p = dir.path().join(name);
            std::fs::write(&p, content).unwrap();
            validate(&p, 1 << 30, 10, |_, _| {}).unwrap_err()
        };
        let mut cells = b"date,amount,description\n2024-01-01,1,ok\n".to_vec();
        cells.extend(std::iter::repeat_n(b"=,".as_slice(), 2_000_000).flatten());
        assert_eq!(check("cells.csv", &cells), format!("line 3 has more than {MAX_FIELDS} fields"));
        let mut header = b"date,amount,description,".to_vec();
        header.extend(std::iter::repeat_n(b'h', 3 << 20));
        assert_eq!(check("header.csv", &header), format!("line 1 has a field of more than {MAX_FIELD_BYTES} bytes"));
        let mut cell = b"date,amount,description\n2024-01-01,1,\"".to_vec();
        cell.extend(std::iter::repeat_n(b'x', 500_000));
        cell.extend_from_slice(b"\"\n");
        assert_eq!(check("cell.csv", &cell), format!("line 2 has a field of more than {MAX_FIELD_BYTES} bytes"));
        let row =
            format!("date,amount,description\n2024-01-01,1,a{}\n", ",".to_owned() + &"y".repeat(60_000)).repeat(1);
        let wide = row.replace(&format!(",{}", "y".repeat(60_000)), &format!(",{}", "y".repeat(60_000)).repeat(5));
        assert_eq!(check("row.csv", wide.as_bytes()), format!("line 2 is longer than {MAX_RECORD_BYTES} bytes"));
        // A quote inside an unquoted field is a plain character (as the parser reads it): the rows
        // after it are records of their own, not one endless quoted field.
        let mut inch = b"date,amount,description\n2024-01-01,-9.99,12\" pizza\n".to_vec();
        for _ in 0..5000 {
            inch.extend_from_slice(b"2024-01-01,-1.00,a b c d e f g h i j k l m n o p q r s t\n");
        }
        let p = dir.path().join("inch.csv");
        std::fs::write(&p, &inch).unwrap();
        assert_eq!(validate(&p, 1 << 30, 10, |_, _| {}).unwrap().rows, 5001);
        // ...and such a quote cannot open a field that hides megabytes from the bounds either.
        let mut hidden = b"date,amount,description\n2024-01-01,1,a\",\"".to_vec();
        hidden.extend(std::iter::repeat_n(b"x\n".as_slice(), 200_000).flatten());
        hidden.extend_from_slice(b"\"\n");
        assert_eq!(check("hidden.csv", &hidden), format!("line 2 has a field of more than {MAX_FIELD_BYTES} bytes"));
        // Records that end in a bare CR are records.
        let cr = "date,amount,description\r".to_string() + &"2024-01-01,1.00,coffee shop visit number\r".repeat(20_000);
        let p = dir.path().join("cr.csv");
        std::fs::write(&p, cr.as_bytes()).unwrap();
        assert_eq!(validate(&p, 1 << 30, 10, |_, _| {}).unwrap().rows, 20_000);
        // Quoted commas and newlines do not count as fields or records.
        let mut quoted = b"date,amount,description\n2024-01-01,1,\"".to_vec();
        quoted.extend(std::iter::repeat_n(b",\n".as_slice(), 5000).flatten());
        quoted.extend_from_slice(b"\"\"\"\n");
        let p = dir.path().join("quoted.csv");
        std::fs::write(&p, &quoted).unwrap();
        assert_eq!(validate(&p, 1 << 30, 10, |_, _| {}).unwrap().rows, 1);
    }

    mod properties {
        use super::*;
        use proptest::prelude::*;

        /// The stated bound on what a reader holds beyond its output, whatever the file: its buffers
        /// and one record of at most `MAX_RECORD_BYTES` (written as a number, so that raising a
        /// record bound fails these properties rather than moving them).
        const HEAP_PER_READER: usize = 768 << 10;

        /// Heap that validating a file may hold at most: the reader, plus its list of zones.
        fn validate_bound(zones: usize) -> usize {
            HEAP_PER_READER + 64 * zones
        }

        /// Heap that reading a zone may hold at most: the reader, plus each kept record (three cells;
        /// the other fields are never copied).
        fn read_zone_bound(zone: &ZoneStart) -> usize {
            HEAP_PER_READER + 256 * zone.rows as usize + 2 * zone.bytes as usize
        }

        /// Files shaped to cost memory: millions of tiny cells on one line, a header of megabytes,
        /// cells of hundreds of KiB, a quote that never closes, and millions of tiny rows.
        fn hostile_files() -> Vec<(&'static str, Vec<u8>)> {
            let header = b"date,amount,description\n".to_vec();
            let with = |body: Vec<u8>| [header.clone(), body].concat();
            vec![
                ("a line of 2M cells", with(b"=,".repeat(1 << 20))),
                (
                    "a 3 MiB header",
                    [b"date,amount,description,".to_vec(), b"h".repeat(3 << 20), b"\n".to_vec()].concat(),
                ),
                (
                    "cells of 300 KiB",
                    with([b"2024-01-01,1,".to_vec(), b"x".repeat(300 << 10), b"\n".to_vec()].concat()),
                ),
                ("an unclosed quote", with([b"2024-01-01,1,\"".to_vec(), b",\n".repeat(1 << 20)].concat())),
                ("400k tiny rows", with(b"1,2,3\n".repeat(400_000))),
            ]
        }

        #[test]
        fn hostile_files_are_read_within_the_heap_bounds() {
            let dir = tempfile::tempdir().unwrap();
            let path = dir.path().join("h.csv");
            for (what, file) in hostile_files() {
                std::fs::write(&path, &file).unwrap();
                let (validated, held) = crate::alloc_probe::peak(|| validate(&path, 1 << 30, 1000, |_, _| {}));
                let zones = validated.as_ref().map(|v| v.zones.len()).unwrap_or(0);
                assert!(held <= validate_bound(zones), "{what}: validation held {held} bytes");
                for z in validated.iter().flat_map(|v| v.zones.iter()) {
                    let columns = validated.as_ref().map(|v| v.columns).unwrap();
                    let (_, held) = crate::alloc_probe::peak(|| read_zone(&path, z, &columns));
                    assert!(held <= read_zone_bound(z), "{what}: a zone of {} rows held {held} bytes", z.rows);
                }
            }
        }

        /// CSV-ish bytes: mostly the characters that matter to the grammar.
        fn csvish() -> impl Strategy<Value = Vec<u8>> {
            proptest::collection::vec(
                prop_oneof![
                    Just(b'a'),
                    Just(b'b'),
                    Just(b','),
                    Just(b'"'),
                    Just(b'\n'),
                    Just(b'\r'),
                    Just(b' '),
                    any::<u8>()
                ],
                0..400,
            )
        }

        proptest! {
            #![proptest_config(ProptestConfig { cases: 2000, ..ProptestConfig::default() })]

            /// Whatever the bytes, when the bound reader lets a file through, every record the
            /// parser makes of it is within the bounds: no quote trick hides a record from them.
            #[test]
            fn what_the_bound_reader_accepts_the_parser_reads_within_bounds(bytes in csvish()) {
                let limits = (4, 8, 16);
                let mut reader = csv_reader(Bounded::with_limits(&bytes[..], 1, limits), false);
                let mut record = csv::ByteRecord::new();
                let mut records = Vec::new();
                loop {
                    match reader.read_byte_record(&mut record) {
                        Ok(true) => records.push(record.clone()),
                        Ok(false) => break,
                        Err(_) => break,
                    }
                }
                if reader.get_ref().broken.is_none() {
                    for r in &records {
                        prop_assert!(r.len() <= limits.0, "{} fields in {:?}", r.len(), r);
                        prop_assert!(r.iter().all(|f| f.len() <= limits.1), "a long field in {:?}", r);
                        prop_assert!(r.as_slice().len() <= limits.2, "a long record {:?}", r);
                    }
                }
            }

            /// A file of a CSV-ish pattern repeated up to 4,000 times: validation and zone reading
            /// hold no more than their bounds, however long the file.
            #[test]
            fn validation_and_zone_reading_hold_bounded_heaps(pattern in csvish(), times in 1usize..4000) {
                let dir = tempfile::tempdir().unwrap();
                let path = dir.path().join("p.csv");
                let mut file = b"date,amount,description\n".to_vec();
                file.extend(std::iter::repeat_n(pattern.as_slice(), times).flatten());
                std::fs::write(&path, &file).unwrap();
                let (validated, held) = crate::alloc_probe::peak(|| validate(&path, 1 << 30, 1000, |_, _| {}));
                let zones = validated.as_ref().map(|v| v.zones.len()).unwrap_or(0);
                prop_assert!(held <= validate_bound(zones), "validation held {held} bytes");
                if let Ok(v) = &validated {
                    for z in &v.zones {
                        let (_, held) = crate::alloc_probe::peak(|| read_zone(&path, z, &v.columns));
                        prop_assert!(held <= read_zone_bound(z), "a zone of {} rows held {held} bytes", z.rows);
                    }
                }
            }

            /// Validation and zone reading never panic, and a file that validates reads back zone by
            /// zone to exactly its rows.
            #[test]
            fn validation_and_zone_reading_never_panic(body in csvish()) {
                let dir = tempfile::tempdir().unwrap();
                let path = dir.path().join("p.csv");
                let mut file = b"date,amount,description\n".to_vec();
                file.extend_from_slice(&body);
                std::fs::write(&path, &file).unwrap();
                if let Ok(v) = validate(&path, 1 << 20, 3, |_, _| {}) {
                    let mut rows = 0;
                    for z in &v.zones {
                        let records = read_zone(&path, z, &v.columns).expect("a validated zone reads back");
                        prop_assert_eq!(records.len() as u64, z.rows);
                        rows += records.len() as u64;
                        let out = process_records(records, &v.columns, &Rules::default());
                        prop_assert!(out.invalid.len() <= KEEP_PER_ZONE && out.flagged.len() <= KEEP_PER_ZONE);
                    }
                    prop_assert_eq!(rows, v.rows);
                }
            }

            /// Any cell: scanning never panics, and a flagged formula is neutralised.
            #[test]
            fn scanning_any_cell_never_panics(cell in ".{0,40}") {
                let (issues, fixed) = scan_cell(&cell);
                if issues.contains(&CellIssue::FormulaInjection) {
                    prop_assert!(fixed.is_some_and(|f| f.starts_with('\'')));
                }
            }
        }
    }

    #[test]
    fn a_header_echoed_in_an_error_is_cut_short() {
        let header: Vec<String> = vec!["x".repeat(10_000), "when\nINFO forged".into()];
        let err = parse_header(&header).unwrap_err();
        assert!(err.len() < 400, "{err}");
        assert!(!err.contains('\n'), "{err}");
    }

    #[test]
    fn flagged_and_invalid_beyond_the_kept_are_counted_not_stored() {
        let cols = Columns { date: 0, amount: 1, description: 2 };
        let records: Vec<Record> = (0..5000)
            .map(|i| Record { line: i + 2, fields: 3, cells: ["nope".into(), "=1".into(), "=2".into()] })
            .collect();
        let out = process_records(records, &cols, &Rules::default());
        assert_eq!((out.invalid_count, out.invalid.len()), (5000, KEEP_PER_ZONE));
        assert_eq!((out.flagged_count, out.flagged.len()), (10_000, KEEP_PER_ZONE));
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
        let rec = |line, f: &[&str]| Record {
            line,
            fields: f.len(),
            cells: [0, 1, 2].map(|i| f.get(i).map(|s| s.to_string()).unwrap_or_default()),
        };
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
