//! Listing and reading the CDC objects of a table (`<url>/<schema>/<table>/`).

mod layout;

use std::sync::Arc;

use bytes::Bytes;
use chrono::{DateTime, Utc};
use futures::TryStreamExt;
use object_store::path::Path as StorePath;
use object_store::{ObjectStore, ObjectStoreExt};

pub use layout::{Compression, ObjectName, ObjectOrder};

use crate::config::{Format, Source};
use crate::error::{Error, Result};

/// One CDC object found under a table prefix.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct SourceObject {
    /// Key relative to the source URL, e.g. `public/orders/2024/05/01/20240501-101500123.csv`.
    pub key: String,
    /// ETag (or the store's version marker); empty when the store gives none.
    pub etag: String,
    /// Size in bytes.
    pub size: u64,
    /// Last-modified time reported by the store.
    pub last_modified: DateTime<Utc>,
    /// What the name says: order, format, compression.
    pub name: ObjectName,
}

/// Objects found under a table prefix, split into data files and others.
#[derive(Debug, Default)]
pub struct Listing {
    /// DMS data files, sorted by [`ObjectOrder`] then key.
    pub objects: Vec<SourceObject>,
    /// Keys that are not DMS data files (reported, never loaded).
    pub ignored: Vec<String>,
}

/// The bytes of an object and the ETag of the version they came from.
#[derive(Debug, Clone)]
pub struct Fetched {
    /// Whole object.
    pub bytes: Bytes,
    /// ETag of the version read (empty when the store gives none).
    pub etag: String,
}

/// Reads DMS objects.
///
/// Contract: [`ObjectSource::list_table`] returns every data object under
/// the table prefix (date folders included), sorted by change order and then
/// key, so two listings of the same objects are identical;
/// [`ObjectSource::get`] returns the bytes of the version that was listed or
/// a newer one (callers compare ETags when it matters).
#[async_trait::async_trait]
pub trait ObjectSource: Send + Sync {
    /// Lists the objects of `schema.table`.
    async fn list_table(&self, schema: &str, table: &str) -> Result<Listing>;
    /// Reads one object whole, with the ETag of the version read.
    async fn get(&self, key: &str) -> Result<Fetched>;
}

/// [`ObjectSource`] over any `object_store` (local directory, S3, GCS, Azure).
pub struct StoreSource {
    store: Arc<dyn ObjectStore>,
    root: StorePath,
    format: Format,
}

impl StoreSource {
    /// Opens the store named by the pipeline's source URL. Credentials and
    /// endpoints of remote stores come from the standard environment variables.
    pub fn open(source: &Source) -> Result<Self> {
        let (store, root): (Arc<dyn ObjectStore>, StorePath) = if source.url.scheme() == "file" {
            let dir = source
                .url
                .to_file_path()
                .map_err(|_| Error::Usage(format!("{} is not a local directory", source.url)))?;
            if !dir.is_dir() {
                return Err(Error::Usage(format!(
                    "source directory {} does not exist; check `source.url` (relative paths start at the working directory)",
                    dir.display()
                )));
            }
            let store = object_store::local::LocalFileSystem::new_with_prefix(&dir)
                .map_err(|e| Error::object_store(format!("opening {}", dir.display()), e))?;
            (Arc::new(store), StorePath::default())
        } else {
            let env: Vec<(String, String)> = std::env::vars()
                .map(|(k, v)| (k.to_ascii_lowercase(), v))
                .collect();
            let (store, path) = object_store::parse_url_opts(&source.url, env)
                .map_err(|e| Error::object_store(format!("opening {}", source.url), e))?;
            (Arc::from(store), path)
        };
        Ok(StoreSource {
            store,
            root,
            format: source.format,
        })
    }

    fn full(&self, key: &str) -> StorePath {
        StorePath::from_iter(self.root.parts().chain(StorePath::from(key).parts()))
    }
}

#[async_trait::async_trait]
impl ObjectSource for StoreSource {
    async fn list_table(&self, schema: &str, table: &str) -> Result<Listing> {
        let prefix = self.full(&format!("{schema}/{table}"));
        let metas: Vec<_> = self
            .store
            .list(Some(&prefix))
            .try_collect()
            .await
            .map_err(|e| Error::object_store(format!("listing {prefix}/"), e))?;
        let root_len = self.root.parts().count();
        let mut listing = Listing::default();
        for meta in metas {
            let key = StorePath::from_iter(meta.location.parts().skip(root_len)).to_string();
            match ObjectName::parse(&key) {
                Some(name) if self.format == Format::Auto || self.format == name.format => {
                    listing.objects.push(SourceObject {
                        key,
                        etag: meta.e_tag.unwrap_or_default(),
                        size: meta.size,
                        last_modified: meta.last_modified,
                        name,
                    })
                }
                _ => listing.ignored.push(key),
            }
        }
        listing
            .objects
            .sort_by(|a, b| (a.name.order, &a.key).cmp(&(b.name.order, &b.key)));
        listing.ignored.sort();
        Ok(listing)
    }

    async fn get(&self, key: &str) -> Result<Fetched> {
        let path = self.full(key);
        let result = self
            .store
            .get(&path)
            .await
            .map_err(|e| Error::object_store(format!("reading {key}"), e))?;
        let etag = result.meta.e_tag.clone().unwrap_or_default();
        let bytes = result
            .bytes()
            .await
            .map_err(|e| Error::object_store(format!("reading {key}"), e))?;
        Ok(Fetched { bytes, etag })
    }
}
