//! The files half of the checker: acknowledged uploads must read back whole and unchanged
//! (`file_lost`, `file_corrupt`).

use super::*;

/// Checks the file operations: every acknowledged upload's hash is the one sent, every
/// download of it reads that hash, none is ever unknown, and every node returns it whole
/// after the faults are healed.
pub(super) fn check_files(ops: &[Op], r: &mut Report, res: &mut Results) {
    let mut sent: HashMap<&str, (&str, u64)> = HashMap::new(); // process → (sha, op)
    let mut send_file: HashMap<&str, &str> = HashMap::new(); // process → file of a send
    let mut acked: HashMap<&str, (&str, u64)> = HashMap::new(); // file → (sha, op)
    let mut finals: HashMap<&str, u64> = HashMap::new();
    for op in ops {
        let (Some(kind), Some(f)) = (op.kind, op.f) else {
            continue;
        };
        let process = op.process.as_str();
        match (f, kind) {
            (F::Upload, Kind::Invoke) => {
                res.files.uploads += 1;
                if let Some(sha) = &op.sha256 {
                    sent.insert(process, (sha, op.index));
                }
            }
            (F::Upload, Kind::Ok) => {
                res.files.uploads_ok += 1;
                let (Some(file), Some(sha)) = (&op.file, &op.sha256) else {
                    continue;
                };
                if let Some((want, inv)) = sent.remove(process) {
                    if want != sha {
                        r.add(
                            AnomalyKind::FileCorrupt,
                            file,
                            format!("upload acknowledged as {sha}, the bytes sent hash to {want}"),
                            vec![inv, op.index],
                        );
                    }
                    acked.insert(file, (want, op.index));
                }
            }
            (F::Upload, Kind::Fail) => res.files.uploads_failed += 1,
            (F::Upload, Kind::Info) => res.files.uploads_info += 1,
            (F::Send, Kind::Invoke) => {
                match &op.file {
                    Some(f) => send_file.insert(process, f),
                    None => send_file.remove(process),
                };
            }
            (F::Send, Kind::Ok) if send_file.contains_key(process) => {
                res.files.attached += 1;
            }
            (F::Send, Kind::Fail) => {
                let refused_unknown = op
                    .error
                    .as_deref()
                    .is_some_and(|e| e.contains("unknown_file"));
                if let (true, Some(file)) = (refused_unknown, send_file.get(process)) {
                    if let Some((_, up)) = acked.get(file) {
                        r.add(
                            AnomalyKind::FileLost,
                            file,
                            "an acknowledged upload was unknown when attached".into(),
                            vec![*up, op.index],
                        );
                    }
                }
            }
            (F::Download | F::FinalDownload, Kind::Ok | Kind::Fail) => {
                let Some(file) = op.file.as_deref() else {
                    continue;
                };
                let Some((want, up)) = acked.get(file) else {
                    continue;
                };
                if kind == Kind::Ok {
                    if f == F::Download {
                        res.files.downloads_ok += 1;
                    } else {
                        res.files.final_downloads += 1;
                        *finals.entry(file).or_insert(0) += 1;
                    }
                    if op.sha256.as_deref() != Some(*want) {
                        r.add(
                            AnomalyKind::FileCorrupt,
                            file,
                            format!(
                                "read {} from node {}, acknowledged {want}",
                                op.sha256.as_deref().unwrap_or("nothing"),
                                op.node.unwrap_or(0)
                            ),
                            vec![*up, op.index],
                        );
                    }
                } else if op.error.as_deref().is_some_and(|e| e.starts_with("404")) {
                    r.add(
                        AnomalyKind::FileLost,
                        file,
                        format!(
                            "node {} answered 404 for an acknowledged upload",
                            op.node.unwrap_or(0)
                        ),
                        vec![*up, op.index],
                    );
                } else if f == F::FinalDownload {
                    res.incomplete.push(format!(
                        "final download of {file} from node {} failed: {}",
                        op.node.unwrap_or(0),
                        op.error.as_deref().unwrap_or("?")
                    ));
                }
            }
            _ => {}
        }
    }
}
