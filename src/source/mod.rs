//! Listing and reading the CDC objects of a table (`<url>/<schema>/<table>/`).

mod layout;
mod s3;

use std::sync::Arc;

use bytes::Bytes;
use chrono::{DateTime, Utc};
use futures::{StreamExt, TryStreamExt};
use object_store::list::{PaginatedListOptions, PaginatedListStore};
use object_store::path::Path as StorePath;
use object_store::{ObjectMeta, ObjectStore, ObjectStoreExt};

pub use layout::{Compression, ObjectName, ObjectOrder, push_padded};

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
    /// LIST requests made (pages; 1 for a local directory walk).
    pub requests: u64,
}

/// An object opened for streaming: its bytes arrive as they are read.
pub struct Opened {
    /// ETag of the version being read (empty when the store gives none).
    pub etag: String,
    /// The object's bytes, in order.
    pub stream: futures::stream::BoxStream<'static, object_store::Result<Bytes>>,
}

/// An error of the transport under a [`StreamReader`] (as opposed to one of
/// a decompressor or decoder reading from it): transient.
#[derive(Debug, thiserror::Error)]
#[error("reading the object failed: {0}")]
pub struct TransportError(#[source] pub object_store::Error);

/// A blocking [`std::io::Read`] over an object's byte stream, for decoders
/// running on a blocking thread. At most two chunks are buffered.
pub struct StreamReader {
    chunks: tokio::sync::mpsc::Receiver<object_store::Result<Bytes>>,
    current: Bytes,
}

impl StreamReader {
    /// Starts forwarding `stream` (on the current tokio runtime) into a reader.
    pub fn new(
        mut stream: futures::stream::BoxStream<'static, object_store::Result<Bytes>>,
    ) -> Self {
        let (tx, rx) = tokio::sync::mpsc::channel(2);
        tokio::spawn(async move {
            while let Some(chunk) = stream.next().await {
                if tx.send(chunk).await.is_err() {
                    return; // the reader is gone
                }
            }
        });
        StreamReader {
            chunks: rx,
            current: Bytes::new(),
        }
    }
}

impl std::io::Read for StreamReader {
    fn read(&mut self, buf: &mut [u8]) -> std::io::Result<usize> {
        while self.current.is_empty() {
            match self.chunks.blocking_recv() {
                None => return Ok(0),
                Some(Ok(chunk)) => self.current = chunk,
                Some(Err(err)) => return Err(std::io::Error::other(TransportError(err))),
            }
        }
        let n = buf.len().min(self.current.len());
        buf[..n].copy_from_slice(&self.current.split_to(n));
        Ok(n)
    }
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
/// the table prefix (date folders included) whose key sorts after
/// `start_after` (all when `None`), sorted by change order and then key, so
/// two listings of the same objects are identical; [`ObjectSource::get`]
/// returns the bytes of the version that was listed or a newer one (callers
/// compare ETags when it matters).
#[async_trait::async_trait]
pub trait ObjectSource: Send + Sync {
    /// Lists the objects of `schema.table` (keys after `start_after` only, when given).
    async fn list_table(
        &self,
        schema: &str,
        table: &str,
        start_after: Option<&str>,
    ) -> Result<Listing>;
    /// Reads one object whole, with the ETag of the version read.
    async fn get(&self, key: &str) -> Result<Fetched> {
        let opened = self.open(key).await?;
        let chunks: Vec<Bytes> = opened
            .stream
            .try_collect()
            .await
            .map_err(|e| Error::object_store(format!("reading {key}"), e))?;
        let bytes = match chunks.len() {
            1 => chunks.into_iter().next().expect("one chunk"),
            _ => Bytes::from(chunks.concat()),
        };
        Ok(Fetched {
            bytes,
            etag: opened.etag,
        })
    }
    /// Opens one object for streaming, with the ETag of the version read.
    async fn open(&self, key: &str) -> Result<Opened>;
    /// True when listing after a key costs less than a full listing (the
    /// store pages server-side, as S3 does); a local directory is walked whole anyway.
    fn lists_incrementally(&self) -> bool;
}

type Remote = (
    Arc<dyn ObjectStore>,
    StorePath,
    Option<Arc<dyn PaginatedListStore>>,
);

/// The remote store of `source.url` (s3, gs, az), its root prefix, and its
/// page-by-page listing where it has one (S3).
fn remote_store(source: &Source) -> Result<Remote> {
    let root = StorePath::from_url_path(source.url.path())
        .map_err(|e| Error::object_store(format!("opening {}", source.url), e.into()))?;
    if matches!(source.url.scheme(), "s3" | "s3a") {
        let s3 = Arc::new(s3::build(source)?);
        return Ok((s3.clone(), root, Some(s3)));
    }
    let mut options: Vec<(String, String)> = std::env::vars()
        .map(|(k, v)| (k.to_ascii_lowercase(), v))
        .collect();
    options.extend(
        source
            .store_options
            .iter()
            .map(|(k, v)| (k.clone(), v.expose().to_string())),
    );
    let (store, _) = object_store::parse_url_opts(&source.url, options)
        .map_err(|e| Error::object_store(format!("opening {}", source.url), e))?;
    Ok((Arc::from(store), root, None))
}

/// A remote store (s3, gs, az) and the prefix of `source.url` in it: what
/// `capture` writes to, with the same settings as a pipeline's source.
pub fn open_store(source: &Source) -> Result<(Arc<dyn ObjectStore>, StorePath)> {
    let (store, root, _) = remote_store(source)?;
    Ok((store, root))
}

/// Objects listed per LIST request (the S3 maximum).
const PAGE_SIZE: usize = 1000;

/// [`ObjectSource`] over any `object_store` (local directory, S3, GCS, Azure).
pub struct StoreSource {
    store: Arc<dyn ObjectStore>,
    /// Page-by-page listing, where the store has it (S3): requests are counted exactly.
    pager: Option<Arc<dyn PaginatedListStore>>,
    root: StorePath,
    format: Format,
}

impl StoreSource {
    /// Opens the store named by the pipeline's source URL. Remote stores take
    /// their settings from the standard environment variables (`AWS_*`,
    /// `GOOGLE_*`, `AZURE_*`: keys, region, endpoint, web identity / IRSA,
    /// container and instance credentials), then from the pipeline file.
    pub fn open(source: &Source) -> Result<Self> {
        if source.url.scheme() == "file" {
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
            return Ok(StoreSource {
                store: Arc::new(store),
                pager: None,
                root: StorePath::default(),
                format: source.format,
            });
        }
        let (store, root, pager) = remote_store(source)?;
        Ok(StoreSource {
            store,
            pager,
            root,
            format: source.format,
        })
    }

    fn full(&self, key: &str) -> StorePath {
        StorePath::from_iter(self.root.parts().chain(StorePath::from(key).parts()))
    }

    /// Every object under `prefix` after `offset`, and the number of requests made.
    async fn list_all(
        &self,
        prefix: &StorePath,
        offset: Option<StorePath>,
    ) -> Result<(Vec<ObjectMeta>, u64)> {
        let context = || format!("listing {prefix}/");
        let Some(pager) = &self.pager else {
            let stream = match &offset {
                Some(offset) => self.store.list_with_offset(Some(prefix), offset),
                None => self.store.list(Some(prefix)),
            };
            let metas = stream
                .try_collect()
                .await
                .map_err(|e| Error::object_store(context(), e))?;
            return Ok((metas, 1));
        };
        let (mut metas, mut requests, mut token) = (Vec::new(), 0, None);
        let prefix = format!("{prefix}/");
        loop {
            let opts = PaginatedListOptions {
                offset: offset.as_ref().map(|o| o.to_string()),
                max_keys: Some(PAGE_SIZE),
                page_token: token.take(),
                ..PaginatedListOptions::default()
            };
            let page = pager
                .list_paginated(Some(&prefix), opts)
                .await
                .map_err(|e| Error::object_store(context(), e))?;
            requests += 1;
            metas.extend(page.result.objects);
            match page.page_token {
                Some(next) => token = Some(next),
                None => return Ok((metas, requests)),
            }
        }
    }
}

#[async_trait::async_trait]
impl ObjectSource for StoreSource {
    async fn list_table(
        &self,
        schema: &str,
        table: &str,
        start_after: Option<&str>,
    ) -> Result<Listing> {
        let prefix = self.full(&format!("{schema}/{table}"));
        let offset = start_after.map(|key| self.full(key));
        let (metas, requests) = self.list_all(&prefix, offset).await?;
        let root_len = self.root.parts().count();
        let mut listing = Listing {
            requests,
            ..Listing::default()
        };
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

    async fn open(&self, key: &str) -> Result<Opened> {
        let result = self
            .store
            .get(&self.full(key))
            .await
            .map_err(|e| Error::object_store(format!("reading {key}"), e))?;
        Ok(Opened {
            etag: result.meta.e_tag.clone().unwrap_or_default(),
            stream: result.into_stream(),
        })
    }

    fn lists_incrementally(&self) -> bool {
        self.pager.is_some()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn pipeline(url: &str, options: &str) -> crate::config::Pipeline {
        let text = format!(
            "name = \"p\"\n[source]\nurl = \"{url}\"\n[source.options]\n{options}\n\
             [warehouse]\nkind = \"local\"\npath = \"wh\"\n\
             [[tables]]\nschema = \"public\"\nname = \"t\"\nprimary_key = [\"id\"]\n"
        );
        crate::config::PipelineFile::parse(&text, "test.toml")
            .and_then(|f| f.validate("test.toml"))
            .unwrap()
    }

    /// A GCS or Azure source builds its store from the pipeline's options
    /// alone (tokens are fetched at the first request): no peer needed.
    #[test]
    fn gcs_and_azure_stores_open_from_the_pipeline_options() {
        let dir = tempfile::tempdir().unwrap();
        let adc = dir.path().join("adc.json");
        std::fs::write(
            &adc,
            r#"{"type": "authorized_user", "client_id": "c", "client_secret": "s", "refresh_token": "r"}"#,
        )
        .unwrap();
        for (url, options) in [
            (
                "gs://bucket/dms",
                format!(
                    "google_application_credentials = {:?}",
                    adc.display().to_string()
                ),
            ),
            (
                "az://container/dms",
                "azure_storage_account_name = \"account\"\nazure_storage_account_key = \"a2V5\""
                    .into(),
            ),
        ] {
            let (_, root, pager) = remote_store(&pipeline(url, &options).source)
                .unwrap_or_else(|e| panic!("{url}: {}", crate::error::chain(&e)));
            assert_eq!(root.as_ref(), "dms", "{url}");
            assert!(pager.is_none(), "only S3 lists page by page");
        }
        // A credentials file that is not there is named.
        let missing = pipeline(
            "gs://bucket/dms",
            "google_application_credentials = \"/nonexistent/adc.json\"",
        );
        let err = crate::error::chain(&remote_store(&missing.source).err().expect("an error"));
        assert!(err.contains("/nonexistent/adc.json"), "{err}");
    }
}
