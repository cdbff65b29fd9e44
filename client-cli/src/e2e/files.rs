//! Attachments of E2E messages: encrypted with a key of their own before the upload,
//! decrypted after the download.

use super::*;

/// Encrypts the file at `path` with a fresh key and uploads the ciphertext.
pub async fn seal_file(
    cli: &Cli,
    path: &Path,
) -> Result<(SealedFile, chatd_proto::FileRef), CliError> {
    let meta = std::fs::metadata(path)
        .map_err(|e| CliError::Usage(format!("cannot open {}: {e}", path.display())))?;
    if meta.len() > FILE_BYTES_MAX {
        return Err(CliError::Usage(format!(
            "{} is larger than {} (E2E files are encrypted in memory)",
            path.display(),
            crate::format::human_bytes(FILE_BYTES_MAX)
        )));
    }
    let plain = std::fs::read(path)
        .map_err(|e| CliError::Usage(format!("cannot read {}: {e}", path.display())))?;
    let (cipher, key) = chatd_e2e::encrypt_file(&plain);
    let dir = tempfile::tempdir()
        .map_err(|e| CliError::Failed(format!("cannot make a temporary directory: {e}")))?;
    // The server sees this name and type, never the real ones.
    let sealed_path = dir.path().join("encrypted.bin");
    std::fs::write(&sealed_path, &cipher)
        .map_err(|e| CliError::Failed(format!("cannot write {}: {e}", sealed_path.display())))?;
    let up = crate::files::upload_file(cli, &sealed_path, Some("application/octet-stream"), None)
        .await?;
    let name = path
        .file_name()
        .and_then(|n| n.to_str())
        .unwrap_or("file")
        .to_string();
    Ok((
        SealedFile {
            file_id: up.file_id.clone(),
            key: key.to_hex(),
            name,
            mime: crate::files::mime_for(path).to_string(),
            size: plain.len() as u64,
        },
        chatd_proto::FileRef {
            file_id: up.file_id,
            name: None,
            mime: None,
            size: Some(up.size),
        },
    ))
}

/// Downloads an encrypted attachment, decrypts it and writes it (whole, or not at all).
pub(super) async fn open_file(
    cli: &Cli,
    chat: &str,
    f: &SealedFile,
    output: Option<PathBuf>,
) -> Result<String, CliError> {
    let key = chatd_e2e::FileKey::from_hex(&f.key)
        .ok_or_else(|| CliError::Failed("the message's file key is malformed".into()))?;
    let dir = tempfile::tempdir()
        .map_err(|e| CliError::Failed(format!("cannot make a temporary directory: {e}")))?;
    let sealed = dir.path().join("encrypted.bin");
    crate::files::download(
        cli,
        &crate::files::DownloadArgs {
            file_id: f.file_id.clone(),
            output: Some(sealed.clone()),
            chat: Some(chat.to_string()),
        },
    )
    .await?;
    let cipher = std::fs::read(&sealed)
        .map_err(|e| CliError::Failed(format!("cannot read {}: {e}", sealed.display())))?;
    let plain = chatd_e2e::decrypt_file(&cipher, &key).map_err(e2e_error)?;
    // The name came from another member: only its last component is used.
    let safe = Path::new(&f.name)
        .file_name()
        .map(PathBuf::from)
        .unwrap_or_else(|| PathBuf::from("file"));
    let out = output.unwrap_or(safe);
    let partial = dir.path().join("plain.part");
    std::fs::write(&partial, &plain)
        .and_then(|()| std::fs::copy(&partial, &out).map(|_| ()))
        .map_err(|e| CliError::Failed(format!("cannot write {}: {e}", out.display())))?;
    Ok(format!(
        "{}  {} bytes  {}\n",
        out.display(),
        plain.len(),
        f.mime
    ))
}
