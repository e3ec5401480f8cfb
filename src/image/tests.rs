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

/// Every file in the store folder with its bytes.
fn store_files(store: &ImageStore) -> Vec<(String, Vec<u8>)> {
    let mut files: Vec<(String, Vec<u8>)> = std::fs::read_dir(&store.dir)
        .unwrap()
        .map(|e| {
            let e = e.unwrap();
            (
                e.file_name().to_string_lossy().into_owned(),
                std::fs::read(e.path()).unwrap(),
            )
        })
        .collect();
    files.sort();
    files
}

#[test]
fn a_corrupt_index_is_an_error_and_left_untouched() {
    let (dir, store) = store();
    create_private_dir(&store.dir).unwrap();
    let corrupt = b"{\"/a.img\": {\"size\": 12,".to_vec();
    std::fs::write(&store.index_path, &corrupt).unwrap();
    let before = store_files(&store);
    let a = dir.path().join("a.img");
    std::fs::write(&a, b"kernel bytes").unwrap();
    let err = format!(
        "{:#}",
        store.import_blob(&a, "kernel", &Silent).unwrap_err()
    );
    assert!(
        err.contains(&store.index_path.display().to_string()),
        "{err}"
    );
    assert!(err.contains("line 1 column"), "{err}");
    assert_eq!(std::fs::read(&store.index_path).unwrap(), corrupt);
    assert_eq!(store_files(&store), before, "nothing imported or written");
}

#[test]
fn corrupt_build_records_are_an_error_before_building() {
    let (_dir, store) = store();
    create_private_dir(&store.dir).unwrap();
    let records = store.dir.join(BUILDS_FILE);
    let corrupt = b"<<<<<<< merge conflict".to_vec();
    std::fs::write(&records, &corrupt).unwrap();
    let err = format!(
        "{:#}",
        store
            .build_flake("base", "/nonexistent/flake#base", false, &Silent)
            .unwrap_err()
    );
    assert!(err.contains(&records.display().to_string()), "{err}");
    assert!(err.contains("line 1 column 1"), "{err}");
    assert!(!err.contains("not installed"), "nix is not run: {err}");
    assert_eq!(std::fs::read(&records).unwrap(), corrupt);
}
