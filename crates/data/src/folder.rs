//! File-based formats: the ImageFolder layout `root/<class>/<file>` and file lists as ImageNet
//! and iNaturalist-2018 users have them.
//!
//! * ImageFolder: classes are the sorted sub-directory names (class index = position, as
//!   torchvision's `ImageFolder`), files sorted by path inside each class (recursively); files
//!   whose extension is not `.jpg/.jpeg/.png` (case-insensitive) are listed as ignored entries.
//! * Text file list: one `relative/path [label]` per line, relative to the list's directory; the
//!   last whitespace-separated token is the label if it parses as an integer (so paths with
//!   spaces work when a label is present); blank lines and `#` comments are skipped; other bad
//!   lines are ignored entries. This covers ImageNet `train.txt`/`val.txt` style lists.
//! * iNaturalist-2018 JSON (`train2018.json`, `val2018.json`): COCO-style `images`
//!   (`id`, `file_name`) and `annotations` (`image_id`, `category_id`); label = `category_id`,
//!   paths relative to the JSON's directory, order = the `images` array.

use std::collections::HashMap;
use std::fs;
use std::path::{Path, PathBuf};

use crate::dataset::{Dataset, Location, Record, RecordError, RecordKind};

pub const IMAGE_EXTENSIONS: &[&str] = &["jpg", "jpeg", "png"];

#[derive(Debug, thiserror::Error)]
pub enum FolderError {
    #[error("i/o error on {path}: {source}")]
    Io {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("{path}: {msg}")]
    Format { path: PathBuf, msg: String },
}

/// A data set of image files on disk (ImageFolder or a file list).
pub struct FileDataset {
    files: Vec<PathBuf>,
    labels: Vec<i64>,
    classes: Vec<String>,
    ignored: Vec<String>,
}

fn is_image(p: &Path) -> bool {
    p.extension()
        .map(|e| e.to_string_lossy().to_ascii_lowercase())
        .is_some_and(|e| IMAGE_EXTENSIONS.contains(&e.as_str()))
}

fn walk(dir: &Path, out: &mut Vec<PathBuf>) -> Result<(), FolderError> {
    let rd = fs::read_dir(dir).map_err(|source| FolderError::Io {
        path: dir.to_path_buf(),
        source,
    })?;
    let mut entries: Vec<PathBuf> = rd.flatten().map(|e| e.path()).collect();
    entries.sort();
    for p in entries {
        if p.is_dir() {
            walk(&p, out)?;
        } else {
            out.push(p);
        }
    }
    Ok(())
}

impl FileDataset {
    /// Index an ImageFolder tree.
    pub fn image_folder(root: &Path) -> Result<Self, FolderError> {
        let rd = fs::read_dir(root).map_err(|source| FolderError::Io {
            path: root.to_path_buf(),
            source,
        })?;
        let mut class_dirs: Vec<PathBuf> = rd
            .flatten()
            .map(|e| e.path())
            .filter(|p| p.is_dir())
            .collect();
        class_dirs.sort();
        let mut ds = Self {
            files: Vec::new(),
            labels: Vec::new(),
            classes: Vec::new(),
            ignored: Vec::new(),
        };
        for (c, dir) in class_dirs.iter().enumerate() {
            ds.classes.push(
                dir.file_name()
                    .map_or_else(String::new, |n| n.to_string_lossy().into()),
            );
            let mut files = Vec::new();
            walk(dir, &mut files)?;
            for f in files {
                if is_image(&f) {
                    ds.files.push(f);
                    ds.labels.push(c as i64);
                } else {
                    ds.ignored.push(f.display().to_string());
                }
            }
        }
        if ds.files.is_empty() {
            return Err(FolderError::Format {
                path: root.to_path_buf(),
                msg: "no class directory holds a .jpg/.jpeg/.png file".into(),
            });
        }
        Ok(ds)
    }

    /// Index a file list: `.json` is read as iNaturalist-2018, anything else as text lines.
    pub fn file_list(list: &Path) -> Result<Self, FolderError> {
        let text = fs::read_to_string(list).map_err(|source| FolderError::Io {
            path: list.to_path_buf(),
            source,
        })?;
        let base = list.parent().unwrap_or(Path::new(".")).to_path_buf();
        if list.extension().is_some_and(|e| e == "json") {
            Self::inat_json(&text, &base, list)
        } else {
            Ok(Self::text_list(&text, &base))
        }
    }

    fn text_list(text: &str, base: &Path) -> Self {
        let mut ds = Self {
            files: Vec::new(),
            labels: Vec::new(),
            classes: Vec::new(),
            ignored: Vec::new(),
        };
        for (n, line) in text.lines().enumerate() {
            let line = line.trim();
            if line.is_empty() || line.starts_with('#') {
                continue;
            }
            let (path, label) = match line.rsplit_once(char::is_whitespace) {
                Some((p, l)) => match l.parse::<i64>() {
                    Ok(l) => (p.trim_end(), l),
                    Err(_) => (line, -1),
                },
                None => (line, -1),
            };
            let p = Path::new(path);
            if p.is_absolute() || p.components().any(|c| c.as_os_str() == "..") {
                ds.ignored.push(format!(
                    "line {}: path outside the list's root: {path}",
                    n + 1
                ));
                continue;
            }
            ds.files.push(base.join(p));
            ds.labels.push(label);
        }
        ds
    }

    fn inat_json(text: &str, base: &Path, list: &Path) -> Result<Self, FolderError> {
        let bad = |msg: String| FolderError::Format {
            path: list.to_path_buf(),
            msg,
        };
        let v: serde_json::Value = serde_json::from_str(text).map_err(|e| bad(e.to_string()))?;
        let images = v["images"]
            .as_array()
            .ok_or_else(|| bad("no `images` array".into()))?;
        let mut label_of: HashMap<i64, i64> = HashMap::new();
        if let Some(anns) = v["annotations"].as_array() {
            for a in anns {
                if let (Some(i), Some(c)) = (a["image_id"].as_i64(), a["category_id"].as_i64()) {
                    label_of.insert(i, c);
                }
            }
        }
        let mut ds = Self {
            files: Vec::new(),
            labels: Vec::new(),
            classes: Vec::new(),
            ignored: Vec::new(),
        };
        if let Some(cats) = v["categories"].as_array() {
            let max = cats
                .iter()
                .filter_map(|c| c["id"].as_i64())
                .max()
                .unwrap_or(-1);
            ds.classes = vec![String::new(); (max + 1).max(0) as usize];
            for c in cats {
                if let (Some(id), Some(name)) = (c["id"].as_i64(), c["name"].as_str()) {
                    ds.classes[id as usize] = name.to_string();
                }
            }
        }
        for (n, im) in images.iter().enumerate() {
            match (im["id"].as_i64(), im["file_name"].as_str()) {
                (Some(id), Some(f))
                    if !Path::new(f).is_absolute() && !f.split('/').any(|c| c == "..") =>
                {
                    ds.files.push(base.join(f));
                    ds.labels.push(label_of.get(&id).copied().unwrap_or(-1));
                }
                _ => ds
                    .ignored
                    .push(format!("images[{n}]: no id/file_name or unsafe path")),
            }
        }
        Ok(ds)
    }

    pub fn path(&self, id: u64) -> Option<&Path> {
        self.files.get(id as usize).map(PathBuf::as_path)
    }
}

impl Dataset for FileDataset {
    fn len(&self) -> usize {
        self.files.len()
    }
    fn label(&self, id: u64) -> i64 {
        self.labels.get(id as usize).copied().unwrap_or(-1)
    }
    fn classes(&self) -> &[String] {
        &self.classes
    }
    fn read_record(&self, id: u64) -> Result<Record, RecordError> {
        let p = self.path(id).ok_or(RecordError::OutOfRange(id))?;
        let bytes = fs::read(p).map_err(|source| RecordError::Io {
            at: Location::File(p.to_path_buf()),
            source,
        })?;
        Ok(Record {
            kind: RecordKind::Encoded,
            bytes,
        })
    }
    fn location(&self, id: u64) -> Location {
        self.path(id)
            .map_or(Location::Sample(id), |p| Location::File(p.to_path_buf()))
    }
    fn ignored_entries(&self) -> &[String] {
        &self.ignored
    }
}
