//! Figure 5: the plugin boundary's cost, from the criterion microbenchmark in
//! bench/benches/boundary.rs, run as a `cargo bench` process of its own (built before the
//! measurements, so that its build time is not counted in the figure's).

use std::fs;

use crate::report::Results;

use super::{criterion, Ctx};

/// Figure 5: the criterion microbenchmark in benches/boundary.rs, run as its own process.
pub fn boundary(cx: &Ctx, out: &mut Results) {
    let m = &cx.mode;
    let md = cx.out_dir.join(format!("{}-boundary.md", cx.stem));
    let log_path = criterion(
        cx,
        "boundary",
        &[
            ("BENCH_HELLO_SO", &cx.b.hello_v1),
            ("BENCH_BOUNDARY_MD", &md),
        ],
    );
    let table = fs::read_to_string(&md).unwrap();
    let _ = fs::remove_file(&md);
    out.section(
        "5. boundary",
        format!(
            "## 5. Plugin boundary cost\n\n`cargo bench -p bench --bench boundary` (criterion): \
             one hello request through the plugin ABI against a direct call of the same handler \
             linked statically, {} interleaved rounds of {} ms warm-up and {} ms measurement \
             each; criterion's own report: {}\n\n{table}\n",
            m.boundary_rounds,
            m.boundary_warmup.as_millis(),
            m.boundary_measure.as_millis(),
            log_path.display()
        ),
        &[],
    );
}
