//! Prometheus text exposition (format 0.0.4) from prometheus-client's OpenMetrics text: what
//! Prometheus scrapes, what `promtool check metrics` lints, and the only format node_exporter's
//! textfile collector reads. The two differ only in naming and framing: OpenMetrics names a
//! counter family without its `_total` suffix and adds `# UNIT` and `# EOF` lines.

/// The content type of [`to_prometheus`]'s output.
pub const CONTENT_TYPE: &str = "text/plain; version=0.0.4; charset=utf-8";

/// Rewrites OpenMetrics text as Prometheus 0.0.4 text.
pub fn to_prometheus(openmetrics: &str) -> String {
    let mut out = String::with_capacity(openmetrics.len());
    // HELP comes before TYPE; a counter's HELP is renamed once its TYPE says so.
    let mut help: Option<(&str, &str)> = None;
    for line in openmetrics.lines() {
        if line == "# EOF" || line.starts_with("# UNIT ") {
            continue;
        }
        if let Some(rest) = line.strip_prefix("# HELP ") {
            flush(&mut out, help.take(), None);
            let (name, text) = rest.split_once(' ').unwrap_or((rest, ""));
            help = Some((name, text));
            continue;
        }
        if let Some(rest) = line.strip_prefix("# TYPE ") {
            let (name, kind) = rest.split_once(' ').unwrap_or((rest, ""));
            let family = if kind == "counter" && !name.ends_with("_total") {
                format!("{name}_total")
            } else {
                name.to_string()
            };
            flush(&mut out, help.take(), Some(&family));
            out.push_str(&format!("# TYPE {family} {kind}\n"));
            continue;
        }
        flush(&mut out, help.take(), None);
        out.push_str(line);
        out.push('\n');
    }
    flush(&mut out, help, None);
    out
}

fn flush(out: &mut String, help: Option<(&str, &str)>, renamed: Option<&str>) {
    if let Some((name, text)) = help {
        out.push_str(&format!("# HELP {} {text}\n", renamed.unwrap_or(name)));
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn counters_get_their_total_name_and_the_framing_goes() {
        let om = "# HELP a_results Results.\n# TYPE a_results counter\na_results_total{x=\"1\"} 2\n\
                  # HELP a_bytes Bytes.\n# TYPE a_bytes counter\n# UNIT a_bytes bytes\na_bytes_total 4\n\
                  # HELP a_up Up.\n# TYPE a_up gauge\na_up 1\n# EOF\n";
        assert_eq!(
            to_prometheus(om),
            "# HELP a_results_total Results.\n# TYPE a_results_total counter\na_results_total{x=\"1\"} 2\n\
             # HELP a_bytes_total Bytes.\n# TYPE a_bytes_total counter\na_bytes_total 4\n\
             # HELP a_up Up.\n# TYPE a_up gauge\na_up 1\n"
        );
    }
}
