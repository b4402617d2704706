//! Figure 5: the plugin boundary's cost, from the criterion microbenchmark in
//! bench/benches/boundary.rs, run as a `cargo bench` process of its own (built before the
//! measurements, so that its build time is not counted in the figure's).

use std::fs;

use crate::{cargo_command, report::Results, root};

use super::Ctx;

/// Figure 5: the criterion microbenchmark in benches/boundary.rs, run as its own process.
pub fn boundary(cx: &Ctx, out: &mut Results) {
    let m = &cx.mode;
    let md = cx.out_dir.join(format!("{}-boundary.md", cx.stem));
    let log_path = cx.out_dir.join(format!("{}-boundary.log", cx.stem));
    let log = fs::File::create(&log_path).unwrap();
    let ok = cargo_command()
        .args([
            "bench",
            "-p",
            "bench",
            "--bench",
            "boundary",
            "--target-dir",
        ])
        .arg(crate::boundary_target())
        .current_dir(root())
        // Criterion's own files next to the results, not in a target/ below bench/.
        .env("CRITERION_HOME", cx.out_dir.join("criterion"))
        .env("BENCH_MODE", m.name)
        .env("BENCH_HELLO_SO", &cx.b.hello_v1)
        .env("BENCH_BOUNDARY_MD", &md)
        .stdout(log.try_clone().unwrap())
        .stderr(log)
        .status()
        .unwrap()
        .success();
    assert!(
        ok,
        "the boundary benchmark failed: see {}",
        log_path.display()
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
