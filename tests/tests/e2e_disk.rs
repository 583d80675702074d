//! A disk that fills up under a running node (a small tmpfs mounted for the test, so it
//! runs as root; otherwise it says why and does nothing): the log fails for good, writes
//! answer 503, `/readyz` answers 503 with the reason and `shardmall_wal_failed` is 1;
//! after a restart with room on the disk every acknowledged write is there.

use std::io::Write;
use std::path::{Path, PathBuf};
use std::process::Command;

use shardmall_tests::*;

/// A tmpfs mounted at a temporary directory, unmounted when dropped.
struct SmallDisk {
    dir: tempfile::TempDir,
}

impl SmallDisk {
    /// `None` (with the reason printed) where the test cannot mount one.
    fn mount(size: &str) -> Option<SmallDisk> {
        let uid = std::fs::read_to_string("/proc/self/status")
            .ok()?
            .lines()
            .find_map(|l| {
                l.strip_prefix("Uid:")
                    .map(|u| u.split_whitespace().next().map(str::to_owned))
            })
            .flatten()?;
        if uid != "0" {
            eprintln!("skipped: mounting a small tmpfs needs root (uid {uid})");
            return None;
        }
        let dir = tempfile::tempdir().expect("a mount point");
        let out = Command::new("mount")
            .args(["-t", "tmpfs", "-o", &format!("size={size}"), "tmpfs"])
            .arg(dir.path())
            .output();
        match out {
            Ok(o) if o.status.success() => Some(SmallDisk { dir }),
            Ok(o) => {
                eprintln!(
                    "skipped: mount failed: {}",
                    String::from_utf8_lossy(&o.stderr)
                );
                None
            }
            Err(e) => {
                eprintln!("skipped: no mount command: {e}");
                None
            }
        }
    }

    fn path(&self) -> &Path {
        self.dir.path()
    }

    /// Fills the disk with a file until the file system says it is full.
    fn fill(&self) -> PathBuf {
        let path = self.path().join("filler");
        let mut f = std::fs::File::create(&path).expect("create the filler");
        let chunk = vec![0u8; 64 * 1024];
        while f.write_all(&chunk).is_ok() {}
        let _ = f.sync_all();
        path
    }
}

impl Drop for SmallDisk {
    fn drop(&mut self) {
        let _ = Command::new("umount")
            .arg("-l")
            .arg(self.dir.path())
            .status();
    }
}

/// Creates product `id` with one SKU.
async fn create_product(node: &Node, admin: &str, id: &str) -> Resp {
    node.post(
        "/v1/products",
        admin,
        &product_body(id, &[(&format!("{id}-s"), 100, 10)]),
    )
    .await
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_full_disk_fails_the_log_and_loses_nothing_acknowledged() {
    let Some(disk) = SmallDisk::mount("48m") else {
        return;
    };
    let data = disk.path().join("data");
    let admin = admin();
    let mut node = Node::config().dir(&data).start().await;
    let mut acknowledged = Vec::new();
    for i in 0..5 {
        let id = format!("before-{i}");
        let (st, body) = create_product(&node, &admin, &id).await;
        assert_eq!(st, 201, "{body}");
        acknowledged.push(id);
    }
    let filler = disk.fill();

    // Writes until the log fails: some may still land in the segment's page cache, but
    // one that needs a block the disk has not got fails, and with it the log.
    let mut failed = None;
    for i in 0..2_000 {
        let id = format!("during-{i}");
        let (st, body) = create_product(&node, &admin, &id).await;
        match st {
            201 => acknowledged.push(id),
            503 => {
                failed = Some(body);
                break;
            }
            other => panic!("a write on a full disk answered {other}: {body}"),
        }
    }
    let failed = failed.expect("2,000 writes on a full disk and none failed");
    assert_eq!(failed["error"]["code"], "unavailable", "{failed}");

    // The node says so, and stays failed: nothing more is acknowledged.
    let (st, ready) = node.get("/readyz", None).await;
    assert_eq!(st, 503, "{ready}");
    let why = ready["error"]["message"].as_str().unwrap_or_default();
    assert!(why.contains("write-ahead log failed"), "{ready}");
    assert_eq!(
        metric_sum(&node.metrics().await, "shardmall_wal_failed"),
        Some(1.0)
    );
    std::fs::remove_file(&filler).expect("make room again");
    let (st, body) = create_product(&node, &admin, "after").await;
    assert_eq!(
        st, 503,
        "a failed log acknowledged a write once the disk had room: {body}"
    );

    // Restarted with room on the disk: every acknowledged product is there.
    node.kill9();
    let node = Node::config().dir(&data).start().await;
    assert_eq!(
        metric_sum(&node.metrics().await, "shardmall_wal_failed"),
        Some(0.0)
    );
    for id in &acknowledged {
        let (st, body) = node.get(&format!("/v1/products/{id}"), Some(&admin)).await;
        assert_eq!(st, 200, "acknowledged product {id} lost: {body}");
    }
    drop(node);
    drop(disk);
}

/// A frame damaged in the middle of the last log segment, with acknowledged frames after
/// it: the node refuses to start and names the file and the offsets, and cuts nothing.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_damaged_log_refuses_to_start_and_cuts_nothing() {
    let dir = tempfile::tempdir().unwrap();
    let admin = admin();
    let mut node = Node::config().dir(dir.path()).start().await;
    for i in 0..20 {
        let (st, body) = create_product(&node, &admin, &format!("p{i}")).await;
        assert_eq!(st, 201, "{body}");
    }
    node.kill9();

    let log_dir = dir.path().join("db").join("log");
    let mut segments: Vec<PathBuf> = std::fs::read_dir(&log_dir)
        .expect("the log dir")
        .map(|e| e.expect("an entry").path())
        .collect();
    segments.sort();
    let last = segments.last().expect("a segment").clone();
    let mut bytes = std::fs::read(&last).expect("the last segment");
    assert!(
        bytes.len() > 4_096,
        "20 products logged: {} bytes",
        bytes.len()
    );
    let middle = bytes.len() / 2;
    bytes[middle] ^= 0xff;
    std::fs::write(&last, &bytes).expect("damage a frame");

    let mut again = Node::config().dir(dir.path()).spawn_expecting_failure();
    let status = poll_until(
        "the node refuses its damaged log",
        std::time::Duration::from_secs(30),
        || {
            let st = again.try_exit();
            async move { st }
        },
    )
    .await;
    assert!(!status.success());
    let log = again.log_tail(200);
    assert!(
        log.contains(&last.display().to_string()) && log.contains("followed by a valid frame"),
        "{log}"
    );
    assert_eq!(
        std::fs::metadata(&last).expect("still there").len(),
        bytes.len() as u64,
        "the damaged segment was cut"
    );
}
