//! Reload time curves: `host reload` wall time (the CLI returns once every worker was replaced)
//! by worker count, and by plugin size (the `bench-padded` fixture, padded with N MiB of
//! pseudo-random data in its read-only section), both with probation 0 (as `host dev`, and
//! figure 3's second column), so that the curve is the reload's own work and not a wait.
//!
//! Every point has a master of its own, all started before the rounds; a round reloads each
//! master once (v1 and v2 of its plugin in turn from round to round), the masters in turn, the
//! order reversed every other round, so that a drift of the machine spreads over every point.

use std::{fs, path::PathBuf, time::Instant};

use super::{curve, Points};
use crate::{chart, report::RoundTable, target_dir, Build, Master, Mode, Probation, Service};

/// Worker processes of the plugin-size curve (as the host, baseline and nginx of figure 1).
const SIZE_WORKERS: usize = 2;

/// The measured curve: its table, and the seconds its builds took (reported apart).
pub struct Curve {
    pub table: RoundTable,
    pub build_secs: f64,
}

/// One master per point (its plugin's v1 and v2), reloaded `rounds` times each, interleaved.
fn rounds(masters: &[(Master, PathBuf, PathBuf)], rounds: usize) -> Vec<Vec<f64>> {
    let mut walls = vec![Vec::new(); masters.len()];
    for r in 0..rounds {
        let mut order: Vec<usize> = (0..masters.len()).collect();
        if r % 2 == 1 {
            order.reverse();
        }
        for i in order {
            let (master, v1, v2) = &masters[i];
            walls[i].push(master.timed_reload(if r % 2 == 0 { v2 } else { v1 }));
        }
    }
    walls
}

fn workers_label(w: usize) -> String {
    if w == 1 {
        "1 worker".into()
    } else {
        format!("{w} workers")
    }
}

fn zero_probation(plugin: &std::path::Path, workers: usize) -> Service<'_> {
    Service {
        probation: Probation::Zero,
        ..Service::new(plugin, workers)
    }
}

/// `host reload` wall time at each of `m.scaling.workers` workers (the hello plugin).
pub fn by_workers(b: &Build, m: &Mode, svg: &std::path::Path) -> Curve {
    let s = m.scaling;
    let masters: Vec<(Master, PathBuf, PathBuf)> = s
        .workers
        .iter()
        .map(|&w| {
            let master = Master::serving(&b.host, &zero_probation(&b.hello_v1, w), "info");
            (master, b.hello_v1.clone(), b.hello_v2.clone())
        })
        .collect();
    let walls = rounds(&masters, s.rounds);
    drop(masters);
    let mut t = RoundTable::new(s.rounds);
    for (&w, v) in s.workers.iter().zip(&walls) {
        t.values(&format!("{}: `host reload` (ms)", workers_label(w)), v);
    }
    for (&w, v) in s.workers.iter().zip(&walls).skip(1) {
        t.ratios(
            &format!("**{} / {}**", workers_label(w), workers_label(s.workers[0])),
            &crate::report::ratios(v, &walls[0]),
            None,
        );
    }
    let points: Points = s
        .workers
        .iter()
        .zip(walls)
        .map(|(&w, v)| (w as f64, v))
        .collect();
    chart::draw_curves(
        svg,
        &[chart::CurvePanel {
            caption: "`host reload` wall time by workers (probation 0, hello)".into(),
            x_desc: "workers",
            y_desc: "ms",
            curves: vec![curve("host reload", &points)],
        }],
    )
    .expect("could not draw the chart");
    Curve {
        table: t,
        build_secs: 0.0,
    }
}

/// Release builds of `bench-padded` at `mib` MiB, v1 and v2, copied to
/// `<target>/bench-plugins/padded-<mib>-v<n>.so`. One target dir for every size and version
/// (`bench-padded`): a variant rebuilds the fixture crate alone, its dependencies stay fresh.
fn build_padded(mib: usize) -> (PathBuf, PathBuf) {
    let target = target_dir();
    let dir = target.join("bench-padded");
    let out = target.join("bench-plugins");
    fs::create_dir_all(&out).unwrap();
    let mib_s = mib.to_string();
    let [v1, v2] = ["v1", "v2"].map(|v| {
        crate::cargo(
            &["build", "--release", "-p", "bench-padded"],
            Some(&dir),
            &[("PAD_MIB", &mib_s), ("PAD_VERSION", v)],
        );
        let to = out.join(format!("padded-{mib}-{v}.so"));
        crate::replace(&dir.join("release/libbench_padded.so"), &to);
        to
    });
    (v1, v2)
}

fn file_mib(p: &std::path::Path) -> f64 {
    fs::metadata(p).unwrap().len() as f64 / (1024.0 * 1024.0)
}

/// `host reload` wall time by plugin file size: hello as it is, then `bench-padded` at each of
/// `m.scaling.sizes_mib` MiB of padding, [`SIZE_WORKERS`] workers each.
pub fn by_size(b: &Build, m: &Mode, svg: &std::path::Path) -> Curve {
    let s = m.scaling;
    let started = Instant::now();
    let mut plugins = vec![("hello".to_string(), b.hello_v1.clone(), b.hello_v2.clone())];
    for &mib in s.sizes_mib {
        let (v1, v2) = build_padded(mib);
        plugins.push((format!("padded {mib} MiB"), v1, v2));
    }
    let build_secs = started.elapsed().as_secs_f64();
    let masters: Vec<(Master, PathBuf, PathBuf)> = plugins
        .iter()
        .map(|(_, v1, v2)| {
            let master = Master::serving(&b.host, &zero_probation(v1, SIZE_WORKERS), "info");
            (master, v1.clone(), v2.clone())
        })
        .collect();
    let walls = rounds(&masters, s.rounds);
    drop(masters);
    let mut t = RoundTable::new(s.rounds);
    let sizes: Vec<f64> = plugins.iter().map(|(_, v1, _)| file_mib(v1)).collect();
    for ((name, _, _), (v, size)) in plugins.iter().zip(walls.iter().zip(&sizes)) {
        t.values(
            &format!(
                "{name} ({} MiB file): `host reload` (ms)",
                crate::report::value(*size)
            ),
            v,
        );
    }
    for ((name, _, _), v) in plugins.iter().zip(&walls).skip(1) {
        t.ratios(
            &format!("**{name} / hello**"),
            &crate::report::ratios(v, &walls[0]),
            None,
        );
    }
    let points: Points = sizes.into_iter().zip(walls).collect();
    chart::draw_curves(
        svg,
        &[chart::CurvePanel {
            caption: format!(
                "`host reload` wall time by plugin file size ({SIZE_WORKERS} workers, probation 0)"
            ),
            x_desc: "plugin file (MiB)",
            y_desc: "ms",
            curves: vec![curve("host reload", &points)],
        }],
    )
    .expect("could not draw the chart");
    Curve {
        table: t,
        build_secs,
    }
}
