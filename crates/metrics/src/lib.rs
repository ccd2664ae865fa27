//! What the coordinator's and the workers' `/metrics` endpoints share: how a scrape is answered.
//!
//! Both registries are `prometheus-client` registries, which encode OpenMetrics 1.0 only. In
//! OpenMetrics a counter family is named without its `_total` suffix (`# TYPE x counter`, then
//! samples `x_total`), and the text ends with `# EOF`. A parser of the classic Prometheus text
//! format 0.0.4 (promtool, older scrapers, a human with curl) reads that sample as a second,
//! untyped family without help text. So the endpoint negotiates as the Go client does:
//! OpenMetrics when the `Accept` header asks for `application/openmetrics-text` (the Prometheus
//! server does), and otherwise the same figures in the classic format, converted by
//! [`to_classic_text`].

use axum::http::header::{ACCEPT, CONTENT_TYPE};
use axum::http::{HeaderMap, StatusCode};
use axum::response::{IntoResponse, Response};

/// Content type of an OpenMetrics answer.
pub const OPENMETRICS: &str = "application/openmetrics-text; version=1.0.0; charset=utf-8";
/// Content type of a classic text-format answer.
pub const CLASSIC_TEXT: &str = "text/plain; version=0.0.4; charset=utf-8";

/// Whether an `Accept` header asks for OpenMetrics (with a non-zero quality).
pub fn wants_openmetrics(accept: &str) -> bool {
    accept.split(',').any(|range| {
        let mut parts = range.split(';').map(str::trim);
        let media = parts.next().unwrap_or_default();
        let refused = parts.any(|p| {
            p.strip_prefix("q=")
                .and_then(|q| q.parse::<f64>().ok())
                .is_some_and(|q| q <= 0.0)
        });
        media.eq_ignore_ascii_case("application/openmetrics-text") && !refused
    })
}

/// The classic text format (0.0.4) of an OpenMetrics text as `prometheus-client` encodes it:
/// counter families take their samples' `_total` name in `# HELP` and `# TYPE`, `unknown`
/// becomes `untyped`, `# UNIT` lines and the final `# EOF` go, and help texts lose the
/// OpenMetrics escape of `"` (the classic format escapes only `\` and line feeds). Samples are
/// unchanged: both formats write them alike.
pub fn to_classic_text(openmetrics: &str) -> String {
    let mut counters = std::collections::HashSet::new();
    for line in openmetrics.lines() {
        if let Some(rest) = line.strip_prefix("# TYPE ")
            && let Some((name, "counter")) = rest.split_once(' ')
        {
            counters.insert(name);
        }
    }
    let family = |name: &str| -> String {
        if counters.contains(name) && !name.ends_with("_total") {
            format!("{name}_total")
        } else {
            name.to_string()
        }
    };
    let mut out = String::with_capacity(openmetrics.len());
    for line in openmetrics.lines() {
        if line == "# EOF" || line.starts_with("# UNIT ") {
            continue;
        }
        if let Some(rest) = line.strip_prefix("# HELP ") {
            let (name, help) = rest.split_once(' ').unwrap_or((rest, ""));
            out.push_str(&format!(
                "# HELP {} {}\n",
                family(name),
                help.replace("\\\"", "\"")
            ));
        } else if let Some(rest) = line.strip_prefix("# TYPE ") {
            let (name, kind) = rest.split_once(' ').unwrap_or((rest, "untyped"));
            let kind = if kind == "unknown" { "untyped" } else { kind };
            out.push_str(&format!("# TYPE {} {kind}\n", family(name)));
        } else {
            out.push_str(line);
            out.push('\n');
        }
    }
    out
}

/// The answer to a scrape with `headers` of the OpenMetrics text `encoded`.
pub fn respond(headers: &HeaderMap, encoded: Result<String, std::fmt::Error>) -> Response {
    let body = match encoded {
        Ok(b) => b,
        Err(e) => return (StatusCode::INTERNAL_SERVER_ERROR, e.to_string()).into_response(),
    };
    let open = headers
        .get_all(ACCEPT)
        .iter()
        .filter_map(|v| v.to_str().ok())
        .any(wants_openmetrics);
    if open {
        ([(CONTENT_TYPE, OPENMETRICS)], body).into_response()
    } else {
        ([(CONTENT_TYPE, CLASSIC_TEXT)], to_classic_text(&body)).into_response()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const OPEN: &str = "# HELP x_steps Steps \\\"done\\\".\n# TYPE x_steps counter\n\
        x_steps_total{job_id=\"j\"} 3\n# HELP x_seconds Time.\n# TYPE x_seconds histogram\n\
        # UNIT x_seconds seconds\nx_seconds_sum 1.5\nx_seconds_count 1\n\
        x_seconds_bucket{le=\"+Inf\"} 1\n# HELP x_done_total Already suffixed.\n\
        # TYPE x_done_total counter\nx_done_total 1\n# HELP x_what Unknown.\n\
        # TYPE x_what unknown\nx_what 2\n# EOF\n";

    #[test]
    fn counters_take_their_sample_names_and_the_rest_stays() {
        let text = to_classic_text(OPEN);
        assert_eq!(
            text,
            "# HELP x_steps_total Steps \"done\".\n# TYPE x_steps_total counter\n\
             x_steps_total{job_id=\"j\"} 3\n# HELP x_seconds Time.\n# TYPE x_seconds histogram\n\
             x_seconds_sum 1.5\nx_seconds_count 1\nx_seconds_bucket{le=\"+Inf\"} 1\n\
             # HELP x_done_total Already suffixed.\n# TYPE x_done_total counter\nx_done_total 1\n\
             # HELP x_what Unknown.\n# TYPE x_what untyped\nx_what 2\n"
        );
    }

    #[test]
    fn openmetrics_only_when_asked_for() {
        let prometheus = "application/openmetrics-text;version=1.0.0,application/openmetrics-text;\
                          version=0.0.1;q=0.75,text/plain;version=0.0.4;q=0.5,*/*;q=0.1";
        assert!(wants_openmetrics(prometheus));
        assert!(!wants_openmetrics("*/*"));
        assert!(!wants_openmetrics("text/plain; version=0.0.4"));
        assert!(!wants_openmetrics("application/openmetrics-text; q=0"));

        let mut headers = HeaderMap::new();
        let plain = respond(&headers, Ok(OPEN.to_string()));
        assert_eq!(plain.headers()[CONTENT_TYPE], CLASSIC_TEXT);
        headers.insert(ACCEPT, prometheus.parse().unwrap());
        let open = respond(&headers, Ok(OPEN.to_string()));
        assert_eq!(open.headers()[CONTENT_TYPE], OPENMETRICS);
        let failed = respond(&headers, Err(std::fmt::Error));
        assert_eq!(failed.status(), StatusCode::INTERNAL_SERVER_ERROR);
    }
}
