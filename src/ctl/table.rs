//! Tables for `--output table` that fit a terminal of 80 columns: columns are as wide as
//! their widest cell, and when the whole is too wide the columns that may shrink (names,
//! dates, output) give up width, widest first, their cells cut with `…`. Ids never shrink:
//! a table is for finding the id to pass to the next command.

/// The width every table fits.
pub const WIDTH: usize = 80;
/// Narrowest a shrinking column gets.
const MIN_SHRUNK: usize = 6;

/// One column: its heading, and whether it may be cut to fit.
#[derive(Debug, Clone, Copy)]
pub struct Col {
    pub head: &'static str,
    pub shrink: bool,
}

/// A column that keeps its width (ids, states, numbers).
pub const fn keep(head: &'static str) -> Col {
    Col {
        head,
        shrink: false,
    }
}

/// A column that may be cut to fit.
pub const fn cut(head: &'static str) -> Col {
    Col { head, shrink: true }
}

fn len(s: &str) -> usize {
    s.chars().count()
}

/// `s` cut to `w` characters, the last of them `…` when something was cut.
pub fn fit(s: &str, w: usize) -> String {
    if len(s) <= w {
        return s.to_string();
    }
    if w == 0 {
        return String::new();
    }
    let mut out: String = s.chars().take(w - 1).collect();
    out.push('…');
    out
}

/// Renders `rows` under `cols` within `width` columns (one space between columns, no
/// trailing spaces). Control characters in cells (a script's output) become spaces, so one
/// row is one line.
pub fn render(cols: &[Col], rows: &[Vec<String>], width: usize) -> String {
    let clean = |s: &str| -> String {
        s.chars()
            .map(|c| if c.is_control() { ' ' } else { c })
            .collect()
    };
    let rows: Vec<Vec<String>> = rows
        .iter()
        .map(|r| r.iter().map(|c| clean(c)).collect())
        .collect();
    let mut w: Vec<usize> = cols.iter().map(|c| len(c.head)).collect();
    for r in &rows {
        for (i, cell) in r.iter().enumerate().take(cols.len()) {
            w[i] = w[i].max(len(cell));
        }
    }
    let total = |w: &[usize]| w.iter().sum::<usize>() + w.len().saturating_sub(1);
    // Take one column of width at a time from the widest column that may shrink.
    while total(&w) > width {
        let widest = (0..cols.len())
            .filter(|&i| cols[i].shrink && w[i] > MIN_SHRUNK)
            .max_by_key(|&i| (w[i], std::cmp::Reverse(i)));
        match widest {
            Some(i) => w[i] -= 1,
            None => break,
        }
    }
    let line = |cells: &mut dyn Iterator<Item = &str>| -> String {
        let parts: Vec<String> = cells
            .enumerate()
            .map(|(i, c)| format!("{:<width$}", fit(c, w[i]), width = w[i]))
            .collect();
        parts.join(" ").trim_end().to_string() + "\n"
    };
    let mut out = line(&mut cols.iter().map(|c| c.head));
    for r in &rows {
        out.push_str(&line(&mut r.iter().map(String::as_str).take(cols.len())));
    }
    out
}

/// `key: value` lines for one object (`show` commands), keys aligned; values are cut to the
/// width too, except those that must stay whole (`whole`: ids, tokens).
pub fn pairs(items: &[(&str, String)], width: usize) -> String {
    let kw = items.iter().map(|(k, _)| len(k)).max().unwrap_or(0) + 1;
    let mut out = String::new();
    for (k, v) in items {
        let key = format!("{k}:");
        let room = width.saturating_sub(kw + 1).max(MIN_SHRUNK);
        out.push_str(&format!("{key:<kw$} {}\n", fit(v, room)).replace(" \n", "\n"));
    }
    out
}

/// An optional value for a cell: `-` when absent.
pub fn opt(v: Option<impl ToString>) -> String {
    v.map(|v| v.to_string()).unwrap_or_else(|| "-".into())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn widest_line(s: &str) -> usize {
        s.lines().map(len).max().unwrap_or(0)
    }

    #[test]
    fn a_wide_table_fits_80_columns_and_keeps_ids_whole() {
        let id = "3f0c9a52-5b1e-4c1a-9d7e-0a4b2c6d8e10".to_string();
        let cols = [
            keep("TASK"),
            cut("KIND"),
            cut("POOL"),
            keep("STATE"),
            cut("CREATED"),
        ];
        let rows = vec![vec![
            id.clone(),
            "script_execution".into(),
            "a-very-long-pool-name-for-desktops".into(),
            "SUCCEEDED".into(),
            "2026-12-01T10:22:33.123Z".into(),
        ]];
        let out = render(&cols, &rows, WIDTH);
        assert!(widest_line(&out) <= WIDTH, "{out}");
        assert!(out.contains(&id), "{out}");
        assert!(out.contains('…'), "{out}");
        assert!(out.lines().next().unwrap().starts_with("TASK "), "{out}");
    }

    #[test]
    fn a_narrow_table_is_left_alone_and_control_characters_go() {
        let out = render(
            &[keep("A"), cut("OUTPUT")],
            &[vec!["x".into(), "one\ttwo\nthree".into()]],
            WIDTH,
        );
        assert_eq!(out, "A OUTPUT\nx one two three\n");
    }

    #[test]
    fn pairs_fit_too() {
        let out = pairs(
            &[("machine", "m1".into()), ("stdout", "y".repeat(200))],
            WIDTH,
        );
        assert!(widest_line(&out) <= WIDTH, "{out}");
        assert!(out.starts_with("machine: m1\n"), "{out}");
    }

    #[test]
    fn fit_cuts_on_characters() {
        assert_eq!(fit("ééééé", 3), "éé…");
        assert_eq!(fit("abc", 3), "abc");
    }
}
