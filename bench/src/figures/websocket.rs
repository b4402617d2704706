//! Figure 13: the WebSocket gateway's section of the results file; the measuring (echo round
//! trips, with and without reloads, and memory per idle connection) is [`crate::gateway`]'s.

use crate::report::Results;

use super::{Ctx, WORKERS};

/// Figure 13: the WebSocket gateway (`bench::gateway`): echo round trips through the chat
/// plugin's `echo` against a plain tokio-tungstenite echo server, the host again with a reload
/// every 2 s, and memory per idle connection.
pub fn gateway(cx: &Ctx, out: &mut Results) {
    let m = &cx.mode;
    let svg = cx.out_dir.join(format!("{}-gateway-memory.svg", cx.stem));
    let f = crate::gateway::run(&cx.b, m, WORKERS, &svg);
    let mut goals = f.echo.goals.clone();
    goals.extend(f.memory.goals.iter().cloned());
    out.section(
        "13. websocket gateway",
        format!(
            "## 13. WebSocket gateway\n\nThe host's WebSocket service (`kind = \"websocket\"`, \
             {WORKERS} gateways, {WORKERS} business workers, the chat plugin, default probation) \
             against `ws_baseline` (tokio-tungstenite echo, {WORKERS} child processes). \
             {rounds} interleaved rounds; in each, a {secs} s run of the bench's client \
             (tokio-tungstenite, one thread, {conns} connections, each sending `echo N` and \
             waiting for the answer with N) on the host, on the host with a `host reload` every \
             {every} s (the chat v1 and v2 builds in turn), and on the baseline. Server CPU is \
             every process of the server over the round trips, as in figure 1. {reloads} reloads \
             in all, {failed} failed.\n\n{echo}\n\
             Memory per idle connection: in each round a fresh host and a fresh baseline in \
             turn, {n} connections opened to each and left idle; the server's memory (every \
             process, from /proc: VmRSS, and Pss from smaps_rollup) before and after, divided by \
             the connections.\n\n{memory}\n\
             Chart of the servers' RSS as {n} idle connections are opened in steps (a fresh \
             server each, after the rounds): {svg}\n\n",
            rounds = m.gateway_rounds,
            secs = m.gateway_secs,
            conns = crate::gateway::CONNS,
            every = crate::gateway::RELOAD_EVERY.as_secs(),
            reloads = f.reloads,
            failed = f.failed_reloads,
            echo = f.echo.render(),
            n = m.gateway_idle_conns,
            memory = f.memory.render(),
            svg = svg.display(),
        ),
        &goals,
    );
}
