//! Rebuild latency on its own (`bench::rebuild`; the suite runs it as one of its figures).
//!
//! Run: `cargo run --release -p bench --bin rebuild_latency [ROUNDS]` (default 21).

fn main() {
    let rounds: usize = std::env::args()
        .nth(1)
        .map(|n| n.parse().expect("ROUNDS must be a number"))
        .unwrap_or(bench::DEFAULT.rebuild_rounds);
    let b = bench::build();
    println!(
        "Rebuild -> new code, 4 workers, {rounds} interleaved rounds\n\n{}",
        bench::rebuild::run(&b, rounds).render()
    );
}
