//! The curves as sections of the results file: what each measured, how, and where its chart
//! is. The suite registers these in its `FULL_ONLY` list.

use std::path::{Path, PathBuf};

use crate::{report::Results, Build, Mode};

/// What a curve needs from the suite: the builds, the mode, and where the results file is
/// (its directory, and its name without `.md`, the prefix of the charts).
pub struct Ctx<'a> {
    pub b: &'a Build,
    pub mode: &'a Mode,
    pub out_dir: &'a Path,
    pub stem: &'a str,
    /// Worker processes per server in the suite's figures.
    pub workers: usize,
}

impl Ctx<'_> {
    fn svg(&self, name: &str) -> PathBuf {
        self.out_dir.join(format!("{}-{name}.svg", self.stem))
    }
}

pub fn workers(cx: &Ctx, out: &mut Results) {
    let svg = cx.svg("scale-workers");
    let c = super::reload_time::by_workers(cx.b, cx.mode, &svg);
    out.section(
        "scale-workers",
        format!(
            "## Scaling: reload time by workers\n\n`host reload` wall time (the CLI returns when \
             every worker was replaced) with `canary_probation = \"0s\"` and `probation = \
             \"0s\"`, the hello plugin (v1 and v2 in turn), a master per worker count, {} \
             rounds of one reload per master (the masters in turn, the order reversed every \
             other round). Ratios are to the fewest workers within each round. No baseline: \
             nothing else reloads a plugin.\n\n{}\nChart: {}\n\n",
            cx.mode.scaling.rounds,
            c.table.render(),
            svg.display()
        ),
        &c.table.goals,
    );
}

pub fn size(cx: &Ctx, out: &mut Results) {
    let svg = cx.svg("scale-size");
    let c = super::reload_time::by_size(cx.b, cx.mode, &svg);
    out.section(
        "scale-size",
        format!(
            "## Scaling: reload time by plugin size\n\n`host reload` wall time with probation 0, \
             2 workers, for hello as it is and for the `bench-padded` fixture (hello's answer \
             with N MiB of pseudo-random bytes in its read-only section, v1 and v2 of each \
             size with different bytes), a master per plugin, {} interleaved rounds as in the \
             workers curve. Ratios are to hello within each round. Building the padded plugins \
             took {:.1} s (in the figure's time, not in the reloads).\n\n{}\nChart: {}\n\n",
            cx.mode.scaling.rounds,
            c.build_secs,
            c.table.render(),
            svg.display()
        ),
        &c.table.goals,
    );
}

pub fn conns(cx: &Ctx, out: &mut Results) {
    let svg = cx.svg("scale-conns");
    let s = cx.mode.scaling;
    let t = super::conns::run_curve(cx.b, cx.mode, cx.workers, &svg);
    out.section(
        "scale-conns",
        format!(
            "## Scaling: reload under load by connections\n\nFigure 2's host runs at {:?} \
             keep-alive connections (wrk, 1 thread): one host ({} workers, default probation, \
             hello v1 and v2 in turn); {} rounds, in each, at every connection count, a {} s run \
             without reloads and one with a `host reload` every 2 s (which goes first \
             alternates). Failed requests are wrk's socket errors plus non-2xx responses.\n\n\
             {}\nChart: {}\n\n",
            s.conns,
            cx.workers,
            s.rounds,
            s.conns_secs,
            t.render(),
            svg.display()
        ),
        &t.goals,
    );
}

pub fn memory(cx: &Ctx, out: &mut Results) {
    let svg = cx.svg("scale-memory");
    let s = cx.mode.scaling;
    let t = super::memory::run(cx.b, cx.mode, cx.workers, &svg);
    out.section(
        "scale-memory",
        format!(
            "## Scaling: memory by idle keep-alive connections\n\nRSS, PSS and USS \
             (Private_Clean + Private_Dirty) from /proc/PID/smaps_rollup of every process of the \
             host (master, {w} workers, hello) and of the baseline (parent, {w} children), with \
             {:?} idle keep-alive connections (each sent one `GET /` and read its response, \
             then left open), sampled 0.5 s after the connections are open. {} rounds, in each a \
             fresh host and a fresh baseline in turn.\n\n{}\nChart: {}\n\n",
            s.idle_conns,
            s.rounds,
            t.render(),
            svg.display(),
            w = cx.workers,
        ),
        &t.goals,
    );
}

pub fn edit_live(cx: &Ctx, out: &mut Results) {
    let svg = cx.svg("edit-live");
    let rounds = cx.mode.scaling.rounds;
    let t = super::edit_live::run(cx.b, rounds, &svg);
    out.section(
        "edit-live",
        format!(
            "## Edit -> live\n\nFrom a one-line edit of a copy of hello's source (the version \
             string it answers with, the file written) to the first response with the new \
             answer (a new connection every 10 ms), through a real cargo build each time: \
             `host dev` (its watcher, a debug build, the plugin watcher's reload), and \
             `cargo build && host reload` in debug and in release on a master with probation 0 \
             serving cargo's output file; 2 workers each; {rounds} rounds, each variant first, \
             second and third in turn.\n\n{}\nChart: {}\n\n",
            t.render(),
            svg.display()
        ),
        &t.goals,
    );
}
