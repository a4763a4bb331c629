//! Results: one line per check, a closing `N passed, N failed` line, optional JUnit XML.

use std::fmt::Write as _;
use std::io::Write as _;

/// One check's outcome.
#[derive(Debug, Clone)]
pub struct Outcome {
    /// Workflow (pull, push, discovery, management, extras, auth).
    pub workflow: &'static str,
    /// What was checked.
    pub name: String,
    /// `Err(reason)` when it failed.
    pub result: Result<(), String>,
}

/// All outcomes of a run.
#[derive(Debug, Default)]
pub struct Report {
    /// In order.
    pub outcomes: Vec<Outcome>,
    /// Print each line as it is recorded.
    pub verbose: bool,
}

impl Report {
    /// Records (and prints) an outcome.
    pub fn record(
        &mut self,
        workflow: &'static str,
        name: impl Into<String>,
        result: Result<(), String>,
    ) {
        let o = Outcome {
            workflow,
            name: name.into(),
            result,
        };
        if self.verbose {
            let mut out = std::io::stdout().lock();
            let _ = match &o.result {
                Ok(()) => writeln!(out, "PASS {}: {}", o.workflow, o.name),
                Err(e) => writeln!(out, "FAIL {}: {}: {}", o.workflow, o.name, e),
            };
        }
        self.outcomes.push(o);
    }

    /// Number of passed checks.
    pub fn passed(&self) -> usize {
        self.outcomes.iter().filter(|o| o.result.is_ok()).count()
    }

    /// The failed checks.
    pub fn failures(&self) -> Vec<&Outcome> {
        self.outcomes.iter().filter(|o| o.result.is_err()).collect()
    }

    /// `N passed, N failed`.
    pub fn summary(&self) -> String {
        format!("{} passed, {} failed", self.passed(), self.failures().len())
    }

    /// The report as JUnit XML.
    pub fn junit(&self) -> String {
        let mut x = String::new();
        let _ = writeln!(x, r#"<?xml version="1.0" encoding="UTF-8"?>"#);
        let _ = writeln!(
            x,
            r#"<testsuites><testsuite name="berth-conformance" tests="{}" failures="{}">"#,
            self.outcomes.len(),
            self.failures().len()
        );
        for o in &self.outcomes {
            let _ = write!(
                x,
                r#"<testcase classname="{}" name="{}">"#,
                esc(o.workflow),
                esc(&o.name)
            );
            if let Err(e) = &o.result {
                let _ = write!(x, r#"<failure message="{}"/>"#, esc(e));
            }
            let _ = writeln!(x, "</testcase>");
        }
        let _ = writeln!(x, "</testsuite></testsuites>");
        x
    }
}

fn esc(s: &str) -> String {
    s.replace('&', "&amp;")
        .replace('<', "&lt;")
        .replace('>', "&gt;")
        .replace('"', "&quot;")
}
