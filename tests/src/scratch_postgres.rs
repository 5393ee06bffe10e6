//! A private PostgreSQL server for tests that stop and start the database
//! (health, recovery) without disturbing the shared one other tests use.
//! It is the same Debian PostgreSQL binaries, run from a temporary data
//! directory on a free loopback port.

use std::{
    path::{Path, PathBuf},
    process::Command,
};

pub struct ScratchPostgres {
    bin: PathBuf,
    dir: PathBuf,
    pub port: u16,
}

impl ScratchPostgres {
    /// initdb + start. Panics with the tool's output if PostgreSQL's server
    /// binaries are missing (deploy/local/postgres.sh installs them).
    #[must_use]
    pub fn start() -> Self {
        let bin = server_bin_dir();
        let dir = std::env::temp_dir().join(format!("shop-scratch-pg-{}", crate::unique_id()));
        std::fs::create_dir_all(&dir).expect("create data dir");
        let port = free_port();
        let pg = Self { bin, dir, port };
        if is_root() {
            run(Command::new("chown")
                .args(["-R", "postgres:postgres"])
                .arg(&pg.dir));
        }
        run(pg
            .as_owner("initdb")
            .args(["-U", "shop", "--auth=trust", "-D"])
            .arg(pg.data()));
        pg.start_server();
        pg
    }

    /// URL of its `postgres` database.
    #[must_use]
    pub fn url(&self) -> String {
        format!("postgres://shop@127.0.0.1:{}/postgres", self.port)
    }

    /// Starts the server and waits until it accepts connections.
    pub fn start_server(&self) {
        let options = format!(
            "-p {} -c listen_addresses=127.0.0.1 -k {}",
            self.port,
            self.dir.display()
        );
        run(self
            .as_owner("pg_ctl")
            .args(["-w", "-t", "60", "-D"])
            .arg(self.data())
            .args(["-l"])
            .arg(self.dir.join("server.log"))
            .args(["-o", &options, "start"]));
    }

    /// Stops the server the hard way (like a crash or a pulled cable).
    pub fn stop_server(&self) {
        run(self
            .as_owner("pg_ctl")
            .args(["-w", "-D"])
            .arg(self.data())
            .args(["-m", "immediate", "stop"]));
    }

    fn data(&self) -> PathBuf {
        self.dir.join("data")
    }

    fn as_owner(&self, tool: &str) -> Command {
        let path = self.bin.join(tool);
        if is_root() {
            // PostgreSQL refuses to run as root.
            let mut c = Command::new("runuser");
            c.args(["-u", "postgres", "--"]).arg(path);
            c
        } else {
            Command::new(path)
        }
    }
}

impl Drop for ScratchPostgres {
    fn drop(&mut self) {
        let _ = self
            .as_owner("pg_ctl")
            .args(["-D"])
            .arg(self.data())
            .args(["-m", "immediate", "stop"])
            .output();
        let _ = std::fs::remove_dir_all(&self.dir);
    }
}

fn run(command: &mut Command) {
    let out = command
        .output()
        .unwrap_or_else(|e| panic!("run {command:?}: {e}"));
    assert!(
        out.status.success(),
        "{command:?} failed: {}\n{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
}

fn is_root() -> bool {
    Command::new("id")
        .arg("-u")
        .output()
        .is_ok_and(|o| String::from_utf8_lossy(&o.stdout).trim() == "0")
}

/// The newest installed PostgreSQL's server binaries.
fn server_bin_dir() -> PathBuf {
    let root = Path::new("/usr/lib/postgresql");
    let mut versions: Vec<u32> = std::fs::read_dir(root)
        .expect("PostgreSQL server is installed (deploy/local/postgres.sh)")
        .filter_map(|e| e.ok()?.file_name().to_str()?.parse().ok())
        .collect();
    versions.sort_unstable();
    let newest = versions.last().expect("a PostgreSQL version is installed");
    root.join(newest.to_string()).join("bin")
}

fn free_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0")
        .and_then(|l| l.local_addr())
        .expect("bind a free port")
        .port()
}
