//! Figure `ab` (by name, with `BENCH_AB_REV=REV`): this tree's host against the host of another
//! commit, each with its own hello v1 (or hello-async, with `BENCH_AB_PLUGIN=hello-async`) and
//! one worker, in interleaved rounds, so that a change of the request path smaller than the
//! drift between two runs (a few per cent from one day to the next) shows as a ratio within
//! each round. Figure 16 compares the host with the baseline; this compares one commit with
//! another.

use crate::{report::Results, Master, Service};

use super::{pair, Ctx};

/// The variable that names the other commit.
const REV: &str = "BENCH_AB_REV";
/// The variable that names the plugin both hosts serve: `hello` (unset) or `hello-async`.
const PLUGIN: &str = "BENCH_AB_PLUGIN";

pub fn ab(cx: &Ctx, out: &mut Results) {
    let Ok(rev) = std::env::var(REV) else {
        out.section(
            "ab",
            format!(
                "## ab. This tree's host against another commit's\n\nNot run: set {REV} to the \
                 commit to compare with (`{REV}=HEAD~3 bash bench/run.sh ab`).\n\n"
            ),
            &[],
        );
        return;
    };
    let (b, m) = (&cx.b, &cx.mode);
    let plugin = std::env::var(PLUGIN).unwrap_or_else(|_| "hello".into());
    let this_plugin = match plugin.as_str() {
        "hello" => &b.hello_v1,
        "hello-async" => &b.hello_async,
        other => panic!("{PLUGIN}={other}: the plugin is hello or hello-async"),
    };
    let (short, other_host, other_plugin) = crate::build_at(&rev, &plugin);
    let this = Master::serving(&b.host, &Service::new(this_plugin, 1), "info");
    let other = Master::serving(&other_host, &Service::new(&other_plugin, 1), "info");
    let this_url = format!("http://{}/", this.addr());
    let other_url = format!("http://{}/", other.addr());
    let (this_pids, other_pids) = (this.pids(), other.pids());
    let table = pair(
        cx,
        ("this tree", &this_url, &this_pids),
        (&short, &other_url, &other_pids),
        [None, None],
    );
    out.section(
        "ab",
        format!(
            "## ab. This tree's host against {short}'s\n\nEach host with its own tree's {plugin} \
             v1 and one worker, {} interleaved rounds of {} s per server (who goes first \
             rotates); this tree / {short} within each round; server CPU is the master's and \
             its worker's.\n\n{}\n",
            m.steady_rounds,
            m.steady_secs,
            table.render()
        ),
        &table.goals,
    );
}
