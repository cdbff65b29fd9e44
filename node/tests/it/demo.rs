//! `chatd demo`: a local cluster of child processes that comes up, serves, and on SIGTERM
//! lets every node drain and exit by itself (no SIGKILL), within the demo's bound.

use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use crate::harness::{free_base_port, CHATD};

/// Generous: three nodes start on a shared 2-core machine.
const READY_TIMEOUT: Duration = Duration::from_secs(90);

fn http_ok(url: &str) -> bool {
    let Some(rest) = url.strip_prefix("http://") else {
        return false;
    };
    let (host, path) = rest.split_once('/').unwrap_or((rest, ""));
    let Ok(mut s) = std::net::TcpStream::connect(host) else {
        return false;
    };
    use std::io::{BufRead, Write};
    let _ = s.set_read_timeout(Some(Duration::from_secs(2)));
    if write!(
        s,
        "GET /{path} HTTP/1.1\r\nHost: {host}\r\nConnection: close\r\n\r\n"
    )
    .is_err()
    {
        return false;
    }
    let mut line = String::new();
    let _ = std::io::BufReader::new(s).read_line(&mut line);
    line.split_whitespace().nth(1) == Some("200")
}

fn alive(pid: u64) -> bool {
    std::path::Path::new(&format!("/proc/{pid}")).exists()
        && !std::fs::read_to_string(format!("/proc/{pid}/stat"))
            .unwrap_or_default()
            .contains(") Z ")
}

#[test]
fn demo_cluster_serves_and_stops_gracefully_on_sigterm() {
    let dir = tempfile::tempdir().unwrap();
    let base = free_base_port(3);
    let log = std::fs::File::create(dir.path().join("demo.log")).unwrap();
    let mut demo = Command::new(CHATD)
        .args([
            "demo",
            "--nodes",
            "3",
            "--base-port",
            &base.to_string(),
            "--data-dir",
        ])
        .arg(dir.path().join("cluster"))
        .stdin(Stdio::null())
        .stdout(log.try_clone().unwrap())
        .stderr(log)
        .spawn()
        .unwrap();
    let demo_json = dir.path().join("cluster").join("demo.json");
    let deadline = Instant::now() + READY_TIMEOUT;
    let (pids, urls) = loop {
        if let Ok(text) = std::fs::read_to_string(&demo_json) {
            if let Ok(v) = serde_json::from_str::<serde_json::Value>(&text) {
                let nodes = v["nodes"].as_array().cloned().unwrap_or_default();
                let urls: Vec<String> = nodes
                    .iter()
                    .map(|n| format!("{}/readyz", n["client_url"].as_str().unwrap()))
                    .collect();
                if nodes.len() == 3 && urls.iter().all(|u| http_ok(u)) {
                    let pids: Vec<u64> = nodes.iter().map(|n| n["pid"].as_u64().unwrap()).collect();
                    break (pids, urls);
                }
            }
        }
        if Instant::now() > deadline || demo.try_wait().unwrap().is_some() {
            let _ = demo.kill();
            panic!(
                "demo not ready: {}",
                std::fs::read_to_string(dir.path().join("demo.log")).unwrap_or_default()
            );
        }
        std::thread::sleep(Duration::from_millis(200));
    };
    assert!(pids.iter().all(|p| alive(*p)));
    assert_eq!(urls.len(), 3);

    let stopped = Instant::now();
    let status = Command::new("kill")
        .args(["-TERM", &demo.id().to_string()])
        .status()
        .unwrap();
    assert!(status.success());
    let bound = Duration::from_millis(chatd::demo::DEMO_STOP_TIMEOUT_MS) + Duration::from_secs(5);
    let exit = loop {
        if let Some(s) = demo.try_wait().unwrap() {
            break s;
        }
        if stopped.elapsed() > bound {
            let _ = demo.kill();
            for p in &pids {
                let _ = Command::new("kill")
                    .args(["-KILL", &p.to_string()])
                    .status();
            }
            panic!("demo did not stop within {bound:?}");
        }
        std::thread::sleep(Duration::from_millis(50));
    };
    let output = std::fs::read_to_string(dir.path().join("demo.log")).unwrap_or_default();
    assert!(exit.success(), "demo exited with {exit}: {output}");
    assert!(
        !output.contains("did not stop in time"),
        "a node had to be killed: {output}"
    );
    for p in &pids {
        assert!(
            !alive(*p),
            "node pid {p} still running after the demo stopped"
        );
    }
    eprintln!("demo stopped in {} ms", stopped.elapsed().as_millis());
}
