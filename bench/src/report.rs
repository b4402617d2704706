//! How results are summarised and written: per-round ratios, their median and spread, the
//! verdict against a goal, Markdown tables, and the results file with its header.
//!
//! The rule for a verdict (docs/benchmarks.md, "Method"): a goal is "met" only when every round
//! is on the right side of it, "missed" when every round is on the wrong side, and "not shown"
//! when the rounds fall on both sides: the machine's noise is then larger than the distance to
//! the goal, and one median would claim more than the runs show.

use std::{
    fmt, fs,
    path::{Path, PathBuf},
    process::Command,
    thread,
};

/// The median of a sample and its range.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct Spread {
    pub median: f64,
    pub min: f64,
    pub max: f64,
}

/// Median (the mean of the two middle values for an even count), min and max.
pub fn spread(values: &[f64]) -> Spread {
    assert!(!values.is_empty(), "no rounds to summarise");
    let mut v = values.to_vec();
    v.sort_by(|a, b| a.total_cmp(b));
    let n = v.len();
    let median = if n % 2 == 1 {
        v[n / 2]
    } else {
        (v[n / 2 - 1] + v[n / 2]) / 2.0
    };
    Spread {
        median,
        min: v[0],
        max: v[n - 1],
    }
}

/// `a[i] / b[i]` for each round: ratios are taken within a round, where both sides ran under
/// the same conditions, never between medians of different rounds.
pub fn ratios(a: &[f64], b: &[f64]) -> Vec<f64> {
    assert_eq!(a.len(), b.len(), "rounds differ in number");
    a.iter().zip(b).map(|(x, y)| x / y).collect()
}

#[derive(Debug, Clone, Copy, PartialEq)]
pub enum Goal {
    AtMost(f64),
    AtLeast(f64),
    /// A count that must be 0 in every round: one failed request is a failure, whatever the
    /// other rounds did, so there is no "not shown" for it.
    None,
    /// A difference `a - b` (not a ratio) at most this many of the unit: for goals stated as an
    /// absolute allowance, such as a host worker's USS within 1 MiB of the baseline's.
    DifferenceAtMost(f64, &'static str),
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Verdict {
    Met,
    Missed,
    NotShown,
}

impl fmt::Display for Verdict {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            Verdict::Met => "met",
            Verdict::Missed => "missed",
            Verdict::NotShown => "not shown",
        })
    }
}

impl Goal {
    pub fn verdict(self, s: Spread) -> Verdict {
        let (right, wrong) = match self {
            Goal::AtMost(g) | Goal::DifferenceAtMost(g, _) => (s.max <= g, s.min > g),
            Goal::AtLeast(g) => (s.min >= g, s.max < g),
            Goal::None => (s.max == 0.0, s.max > 0.0),
        };
        if right {
            Verdict::Met
        } else if wrong {
            Verdict::Missed
        } else {
            Verdict::NotShown
        }
    }
}

impl fmt::Display for Goal {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Goal::AtMost(g) => write!(f, "<= {g}"),
            Goal::AtLeast(g) => write!(f, ">= {g}"),
            Goal::None => f.write_str("0 in every round"),
            Goal::DifferenceAtMost(g, unit) => write!(f, "difference <= {g} {unit}"),
        }
    }
}

/// A measured value, with as many digits as its size makes worth reading.
pub fn value(v: f64) -> String {
    let a = v.abs();
    if a >= 1000.0 {
        // Thousands separated, as in "85,095".
        let s = format!("{:.0}", v.abs());
        let mut out = String::new();
        for (i, c) in s.chars().enumerate() {
            if i > 0 && (s.len() - i) % 3 == 0 {
                out.push(',');
            }
            out.push(c);
        }
        if v < 0.0 {
            out.insert(0, '-');
        }
        out
    } else if a >= 100.0 || a.fract() == 0.0 {
        // Counts are whole numbers: "29", not "29.0".
        format!("{v:.0}")
    } else if a >= 10.0 {
        format!("{v:.1}")
    } else {
        format!("{v:.2}")
    }
}

pub fn ratio(v: f64) -> String {
    format!("{v:.3}")
}

/// A Markdown table.
pub struct Table {
    rows: Vec<Vec<String>>,
}

impl Table {
    pub fn new<S: AsRef<str>>(header: &[S]) -> Table {
        Table {
            rows: vec![header.iter().map(|h| h.as_ref().to_string()).collect()],
        }
    }

    pub fn row(&mut self, cells: Vec<String>) {
        self.rows.push(cells);
    }

    pub fn render(&self) -> String {
        let line = |cells: &[String]| format!("| {} |\n", cells.join(" | "));
        let mut out = line(&self.rows[0]);
        out += &line(&vec!["---".to_string(); self.rows[0].len()]);
        for r in &self.rows[1..] {
            out += &line(r);
        }
        out
    }
}

/// A table of per-round values: one column per round, then the median and [min-max] over the
/// rounds, the goal and the verdict (for rows that have a goal).
pub struct RoundTable {
    rounds: usize,
    table: Table,
    /// (what, spread, goal, verdict) of every row with a goal, for the summary.
    pub goals: Vec<(String, Spread, Goal, Verdict)>,
}

impl RoundTable {
    pub fn new(rounds: usize) -> RoundTable {
        let mut header = vec![String::new()];
        header.extend((1..=rounds).map(|r| format!("round {r}")));
        header.extend(["median", "[min-max]", "goal", "verdict"].map(String::from));
        RoundTable {
            rounds,
            table: Table::new(&header),
            goals: Vec::new(),
        }
    }

    /// A row of measured values (formatted with [`value`]).
    pub fn values(&mut self, name: &str, v: &[f64]) {
        self.row(name, v, value, None);
    }

    /// A row of ratios (formatted with [`ratio`]), with its goal if it has one.
    pub fn ratios(&mut self, name: &str, v: &[f64], goal: Option<Goal>) {
        self.row(name, v, ratio, goal);
    }

    /// A row of measured values judged against an absolute goal (a count, a latency bound).
    pub fn values_with_goal(&mut self, name: &str, v: &[f64], goal: Goal) {
        self.row(name, v, value, Some(goal));
    }

    /// Three rows: `a`, `b` and `a / b` round by round, the goal on the ratio.
    pub fn compare(
        &mut self,
        what: &str,
        (a_name, a): (&str, &[f64]),
        (b_name, b): (&str, &[f64]),
        goal: Option<Goal>,
    ) {
        self.values(&format!("{what}: {a_name}"), a);
        self.values(&format!("{what}: {b_name}"), b);
        self.ratios(
            &format!("**{what}: {a_name} / {b_name}**"),
            &ratios(a, b),
            goal,
        );
    }

    /// Three rows: `a`, `b` and `a - b` round by round (in the values' unit, formatted as
    /// values), the goal on the difference.
    pub fn difference(
        &mut self,
        what: &str,
        (a_name, a): (&str, &[f64]),
        (b_name, b): (&str, &[f64]),
        goal: Option<Goal>,
    ) {
        self.values(&format!("{what}: {a_name}"), a);
        self.values(&format!("{what}: {b_name}"), b);
        let d: Vec<f64> = a.iter().zip(b).map(|(x, y)| x - y).collect();
        self.row(&format!("**{what}: {a_name} - {b_name}**"), &d, value, goal);
    }

    fn row(&mut self, name: &str, v: &[f64], fmt: fn(f64) -> String, goal: Option<Goal>) {
        assert_eq!(v.len(), self.rounds, "{name}: one value per round");
        let s = spread(v);
        let mut cells = vec![name.to_string()];
        cells.extend(v.iter().map(|x| fmt(*x)));
        cells.push(fmt(s.median));
        cells.push(format!("[{}-{}]", fmt(s.min), fmt(s.max)));
        match goal {
            Some(g) => {
                let verdict = g.verdict(s);
                cells.push(g.to_string());
                cells.push(verdict.to_string());
                self.goals.push((name.replace("**", ""), s, g, verdict));
            }
            None => cells.extend([String::new(), String::new()]),
        }
        self.table.row(cells);
    }

    pub fn render(&self) -> String {
        self.table.render()
    }
}

/// The results of one suite run: printed section by section as figures finish, and rewritten
/// whole to its file after each one, so that a run stopped half-way still leaves what it had.
pub struct Results {
    pub path: PathBuf,
    header: String,
    sections: Vec<String>,
    goals: Vec<(String, String, Spread, Goal, Verdict)>,
    footer: String,
}

impl Results {
    pub fn new(path: PathBuf, header: String) -> Results {
        print!("{header}");
        let r = Results {
            path,
            header,
            sections: Vec::new(),
            goals: Vec::new(),
            footer: String::new(),
        };
        r.write();
        r
    }

    /// A finished figure: its Markdown, and the goal rows of its tables.
    pub fn section(
        &mut self,
        figure: &str,
        text: String,
        goals: &[(String, Spread, Goal, Verdict)],
    ) {
        print!("{text}");
        self.sections.push(text);
        self.goals.extend(
            goals
                .iter()
                .map(|(what, s, g, v)| (figure.to_string(), what.clone(), *s, *g, *v)),
        );
        self.write();
    }

    pub fn footer(&mut self, text: String) {
        print!("{text}");
        self.footer = text;
        self.write();
    }

    /// The goals of every figure so far in one table (median and spread, goal, verdict).
    pub fn summary(&self) -> String {
        if self.goals.is_empty() {
            return String::new();
        }
        let mut t = Table::new(&["figure", "what", "median", "[min-max]", "goal", "verdict"]);
        for (figure, what, s, g, v) in &self.goals {
            // Ratios have a goal around 1; counts and milliseconds have larger goals.
            let f = if matches!(g, Goal::None | Goal::DifferenceAtMost(..)) || g.bound() > 10.0 {
                value
            } else {
                ratio
            };
            t.row(vec![
                figure.clone(),
                what.clone(),
                f(s.median),
                format!("[{}-{}]", f(s.min), f(s.max)),
                g.to_string(),
                format!("**{v}**"),
            ]);
        }
        format!("## Goals\n\n{}\n", t.render())
    }

    fn write(&self) {
        let mut text = self.header.clone();
        text += &self.summary();
        for s in &self.sections {
            text += s;
        }
        text += &self.footer;
        if let Some(dir) = self.path.parent() {
            fs::create_dir_all(dir).unwrap();
        }
        fs::write(&self.path, text).unwrap();
    }
}

impl Goal {
    fn bound(self) -> f64 {
        match self {
            Goal::AtMost(g) | Goal::AtLeast(g) | Goal::DifferenceAtMost(g, _) => g,
            Goal::None => 0.0,
        }
    }
}

/// The output of a command, trimmed; stderr too, as `nginx -v` prints there.
fn output(cmd: &str, args: &[&str], dir: Option<&Path>) -> Option<String> {
    let mut c = Command::new(cmd);
    c.args(args);
    if let Some(d) = dir {
        c.current_dir(d);
    }
    let out = c.output().ok()?;
    let mut text = String::from_utf8_lossy(&out.stdout).into_owned();
    text += &String::from_utf8_lossy(&out.stderr);
    Some(text.trim().to_string())
}

/// `git rev-parse --short HEAD`, with `-dirty` when a tracked file differs from it.
pub fn commit(root: &Path) -> String {
    let head = output("git", &["rev-parse", "--short", "HEAD"], Some(root))
        .unwrap_or_else(|| "unknown".into());
    let dirty = output(
        "git",
        &["status", "--porcelain", "--untracked-files=no"],
        Some(root),
    )
    .is_some_and(|s| !s.is_empty());
    if dirty {
        format!("{head}-dirty")
    } else {
        head
    }
}

/// UTC now as `date` prints it with `format` (coreutils, rather than a calendar by hand).
pub fn utc_now(format: &str) -> String {
    output("date", &["-u", format], None).unwrap_or_else(|| "unknown-date".into())
}

/// The machine: cores, CPU model, kernel; and the versions of the load tool and the peer.
pub struct Machine {
    pub cores: usize,
    pub cpu: String,
    pub kernel: String,
    pub wrk: String,
    pub nginx: String,
}

pub fn machine() -> Machine {
    let cpu = fs::read_to_string("/proc/cpuinfo")
        .ok()
        .and_then(|t| {
            t.lines()
                .find(|l| l.starts_with("model name"))
                .and_then(|l| l.split_once(':'))
                .map(|(_, m)| m.trim().to_string())
        })
        .unwrap_or_else(|| "unknown CPU".into());
    let kernel = nix::sys::utsname::uname()
        .map(|u| u.release().to_string_lossy().into_owned())
        .unwrap_or_else(|_| "unknown".into());
    // `wrk -v` prints its version line and then its usage.
    let wrk = output("wrk", &["-v"], None)
        .and_then(|t| {
            t.lines()
                .next()
                .map(|l| l.split(" [").next().unwrap_or(l).to_string())
        })
        .unwrap_or_else(|| "wrk not found".into());
    let nginx = output("nginx", &["-v"], None)
        .map(|t| t.trim_start_matches("nginx version: ").to_string())
        .unwrap_or_else(|| "nginx not found".into());
    Machine {
        cores: thread::available_parallelism().map_or(0, |n| n.get()),
        cpu,
        kernel,
        wrk,
        nginx,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn median_and_range() {
        assert_eq!(
            spread(&[3.0, 1.0, 2.0]),
            Spread {
                median: 2.0,
                min: 1.0,
                max: 3.0
            }
        );
        assert_eq!(spread(&[4.0, 1.0, 2.0, 3.0]).median, 2.5);
    }

    #[test]
    fn verdicts_need_the_whole_spread() {
        let s = |min, max| Spread {
            median: (min + max) / 2.0,
            min,
            max,
        };
        assert_eq!(Goal::AtMost(1.05).verdict(s(0.98, 1.05)), Verdict::Met);
        assert_eq!(Goal::AtMost(1.05).verdict(s(1.06, 1.2)), Verdict::Missed);
        assert_eq!(Goal::AtMost(1.05).verdict(s(1.0, 1.1)), Verdict::NotShown);
        assert_eq!(Goal::AtLeast(0.95).verdict(s(0.95, 1.0)), Verdict::Met);
        assert_eq!(Goal::AtLeast(0.95).verdict(s(0.8, 0.94)), Verdict::Missed);
        assert_eq!(Goal::AtLeast(0.95).verdict(s(0.9, 1.0)), Verdict::NotShown);
        assert_eq!(Goal::None.verdict(s(0.0, 0.0)), Verdict::Met);
        assert_eq!(Goal::None.verdict(s(0.0, 3.0)), Verdict::Missed);
        let mib = Goal::DifferenceAtMost(1.0, "MiB");
        assert_eq!(mib.verdict(s(-0.5, 0.9)), Verdict::Met);
        assert_eq!(mib.verdict(s(0.5, 1.5)), Verdict::NotShown);
        assert_eq!(mib.verdict(s(1.2, 3.0)), Verdict::Missed);
        assert_eq!(mib.to_string(), "difference <= 1 MiB");
    }

    #[test]
    fn ratios_are_per_round() {
        assert_eq!(ratios(&[2.0, 3.0], &[1.0, 2.0]), vec![2.0, 1.5]);
    }

    #[test]
    fn values_read_well() {
        assert_eq!(value(85095.4), "85,095");
        assert_eq!(value(1234567.0), "1,234,567");
        assert_eq!(value(11.02), "11.0");
        assert_eq!(value(2.174), "2.17");
        assert_eq!(value(0.0), "0");
        assert_eq!(value(448.0), "448");
        assert_eq!(value(29.0), "29");
    }
}
