//! How commits reach a Delta log in object storage.
//!
//! A Delta commit is the creation of `_delta_log/<version>.json`; two
//! writers racing for the same version must not both succeed. delta-rs's
//! default log store creates it with a conditional put (`PutMode::Create`:
//! `If-None-Match: *` on S3, `ifGenerationMatch=0` on GCS, `If-None-Match`
//! on Azure), so the loser gets "version already exists" and retries on top
//! of the winner's commit. delta-rs registers it for `file://` and
//! `memory://` only; its S3 crate would add a DynamoDB lock or an unsafe
//! rename instead. [`register`] names the default log store for the object
//! stores cdcflow opens itself (with the source's credential settings).

use std::sync::{Arc, Once};

use deltalake::DeltaResult;
use deltalake::logstore::{
    LogStore, LogStoreFactory, ObjectStoreRef, StorageConfig, default_logstore, logstore_factories,
};

/// The schemes whose Delta commits are conditional puts.
const SCHEMES: [&str; 5] = ["s3", "s3a", "gs", "az", "abfss"];

/// delta-rs's default log store (commits by conditional put).
struct ConditionalPut;

impl LogStoreFactory for ConditionalPut {
    fn with_options(
        &self,
        prefixed_store: ObjectStoreRef,
        root_store: ObjectStoreRef,
        location: &url::Url,
        options: &StorageConfig,
    ) -> DeltaResult<Arc<dyn LogStore>> {
        Ok(default_logstore(
            prefixed_store,
            root_store,
            location,
            options,
        ))
    }
}

/// Makes tables in object storage commit by conditional put (once per
/// process).
pub(super) fn register() {
    static ONCE: Once = Once::new();
    ONCE.call_once(|| {
        let factories = logstore_factories();
        for scheme in SCHEMES {
            let url = url::Url::parse(&format!("{scheme}://")).expect("a scheme URL");
            factories.insert(url, Arc::new(ConditionalPut));
        }
    });
}
