//! The peer: nginx from Debian's packages, serving a fixed 200 with the same number of worker
//! processes, reloaded with `nginx -s reload`.

use std::{
    fs,
    net::{TcpListener, TcpStream},
    os::unix::process::CommandExt,
    path::PathBuf,
    process::{Child, Command, Stdio},
    thread,
    time::{Duration, Instant},
};

use nix::{
    sys::signal::{killpg, Signal},
    unistd::Pid,
};

pub struct Nginx {
    dir: tempfile::TempDir,
    pub addr: String,
    pub pid: u32,
    child: Child,
}

impl Nginx {
    pub fn start(workers: usize) -> Nginx {
        let dir = tempfile::tempdir().unwrap();
        // A free port: bind to 0, read it, let it go (nginx needs the number in its config).
        let port = TcpListener::bind("127.0.0.1:0")
            .unwrap()
            .local_addr()
            .unwrap()
            .port();
        let d = dir.path().display();
        let conf = format!(
            "worker_processes {workers};\npid {d}/nginx.pid;\nerror_log {d}/error.log;\n\
             events {{ worker_connections 4096; }}\n\
             http {{\n  access_log off;\n  keepalive_requests 100000000;\n  keepalive_timeout 75s;\n\
             client_body_temp_path {d}/body;\n  proxy_temp_path {d}/proxy;\n  fastcgi_temp_path {d}/fastcgi;\n\
             uwsgi_temp_path {d}/uwsgi;\n  scgi_temp_path {d}/scgi;\n\
             server {{ listen 127.0.0.1:{port}; location / {{ return 200 \"Hello from nginx\\n\"; }} }}\n}}\n"
        );
        fs::write(dir.path().join("nginx.conf"), conf).unwrap();
        let child = Command::new("nginx")
            .args(["-e", "stderr", "-g", "daemon off;", "-p"])
            .arg(dir.path())
            .arg("-c")
            .arg(dir.path().join("nginx.conf"))
            .stdout(Stdio::null())
            .process_group(0)
            .spawn()
            .expect("could not run nginx (bench/run.sh installs it)");
        let addr = format!("127.0.0.1:{port}");
        let start = Instant::now();
        while TcpStream::connect(&addr).is_err() {
            assert!(
                start.elapsed() < Duration::from_secs(10),
                "nginx did not start"
            );
            thread::sleep(Duration::from_millis(20));
        }
        Nginx {
            pid: child.id(),
            dir,
            addr,
            child,
        }
    }

    fn conf(&self) -> PathBuf {
        self.dir.path().join("nginx.conf")
    }

    /// `nginx -s reload`: new workers start, old ones finish and close their connections.
    pub fn reload(&self) {
        // Its stderr ("signal process started") is shown only if the reload fails, so that it
        // does not mix with the results.
        let out = Command::new("nginx")
            .args(["-e", "stderr", "-p"])
            .arg(self.dir.path())
            .arg("-c")
            .arg(self.conf())
            .args(["-s", "reload"])
            .output()
            .unwrap();
        assert!(
            out.status.success(),
            "nginx -s reload failed: {}",
            String::from_utf8_lossy(&out.stderr)
        );
    }
}

impl Drop for Nginx {
    fn drop(&mut self) {
        let _ = killpg(Pid::from_raw(self.pid as i32), Signal::SIGKILL);
        let _ = self.child.wait();
    }
}
