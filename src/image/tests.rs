use super::*;
use crate::progress::Silent;

fn store() -> (tempfile::TempDir, ImageStore) {
    let dir = tempfile::tempdir().unwrap();
    let store = ImageStore::new(&Home::at(dir.path().join("home")));
    (dir, store)
}

#[test]
fn imports_by_content_once() {
    let (dir, store) = store();
    let a = dir.path().join("a.img");
    let b = dir.path().join("b.img");
    std::fs::write(&a, b"kernel bytes").unwrap();
    std::fs::write(&b, b"kernel bytes").unwrap();
    let first = store.import_blob(&a, "kernel", &Silent).unwrap();
    let second = store.import_blob(&b, "kernel", &Silent).unwrap();
    assert_eq!(first, second, "same content, same stored file");
    assert_eq!(
        first.digest,
        format!("sha256:{}", hex::encode(Sha256::digest(b"kernel bytes")))
    );
    assert_eq!(std::fs::read(&first.path).unwrap(), b"kernel bytes");
    let stored = std::fs::read_dir(&store.dir)
        .unwrap()
        .filter(|e| {
            e.as_ref()
                .unwrap()
                .file_name()
                .to_string_lossy()
                .ends_with(".kernel")
        })
        .count();
    assert_eq!(stored, 1);
}

#[test]
fn changed_file_is_imported_again() {
    let (dir, store) = store();
    let a = dir.path().join("a.img");
    std::fs::write(&a, b"one").unwrap();
    let first = store.import_blob(&a, "kernel", &Silent).unwrap();
    std::fs::write(&a, b"two!").unwrap();
    let second = store.import_blob(&a, "kernel", &Silent).unwrap();
    assert_ne!(first.digest, second.digest);
    assert_eq!(std::fs::read(&second.path).unwrap(), b"two!");
}

#[test]
fn unchanged_path_size_and_mtime_skip_reading() {
    let (dir, store) = store();
    let a = dir.path().join("a.img");
    std::fs::write(&a, b"original").unwrap();
    let first = store.import_blob(&a, "kernel", &Silent).unwrap();
    // Rewrite the content in place with the same size and mtime: the index
    // answers, so the import does not read the file (that is what makes it instant).
    let mtime = std::fs::metadata(&a).unwrap().modified().unwrap();
    let mut f = std::fs::OpenOptions::new().write(true).open(&a).unwrap();
    f.write_all(b"ORIGINAL").unwrap();
    f.set_modified(mtime).unwrap();
    drop(f);
    let second = store.import_blob(&a, "kernel", &Silent).unwrap();
    assert_eq!(first, second);
}

#[test]
fn sparse_raw_disk_stays_sparse_and_is_sized() {
    let (dir, store) = store();
    let raw = dir.path().join("disk.raw");
    let f = File::create(&raw).unwrap();
    f.set_len(64 << 20).unwrap();
    drop(f);
    let base = store.import_disk(&raw, &Silent).unwrap();
    assert_eq!(base.format, DiskFormat::Raw);
    assert_eq!(base.virtual_size, 64 << 20);
    let meta = std::fs::metadata(&base.file.path).unwrap();
    assert_eq!(meta.len(), 64 << 20);
    assert!(meta.blocks() * 512 < 1 << 20, "copy is sparse");
    assert_eq!(meta.permissions().mode() & 0o777, 0o444);
}

#[test]
fn missing_file_names_the_path() {
    let (dir, store) = store();
    let err = store
        .import_disk(&dir.path().join("nope.qcow2"), &Silent)
        .unwrap_err();
    assert!(format!("{err:#}").contains("nope.qcow2"), "{err:#}");
}

#[test]
fn backing_files_are_refused() {
    let (dir, store) = store();
    let base = dir.path().join("base.qcow2");
    let top = dir.path().join("top.qcow2");
    qemu_img::create_blank(&base, 1 << 20).unwrap();
    qemu_img::create_overlay(&base, DiskFormat::Qcow2, &top, None).unwrap();
    let err = store.import_disk(&top, &Silent).unwrap_err().to_string();
    assert!(err.contains("backing file"), "{err}");
}
