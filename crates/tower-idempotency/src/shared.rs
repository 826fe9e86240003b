//! What every clone of a layer and every service made from it share.

use std::any::Any;
use std::sync::Arc;

use tokio_util::task::TaskTracker;

use crate::config::Config;
use crate::store::Store;

/// The store, the options, and the work that outlives its caller. The layer builds it and
/// each service holds an `Arc` of it, so a request clones one pointer, and the service never
/// needs the layer.
#[derive(Clone)]
pub(crate) struct Shared {
    pub(crate) store: Arc<dyn Store>,
    pub(crate) config: Config,
    /// The work that outlives its caller: handlers whose caller went away, and outcomes still
    /// being written after a store failure. A clone tracks the same work.
    pub(crate) background: TaskTracker,
    /// What the store gives handlers to open their transactions with, when it joins them
    /// ([`Store::transaction_source`]); asked once, when the layer is made.
    pub(crate) transactions: Option<Arc<dyn Any + Send + Sync>>,
}

impl Shared {
    /// `store` with the default options and no work in the background.
    pub(crate) fn new(store: Arc<dyn Store>) -> Self {
        Self {
            transactions: store.transaction_source(),
            store,
            config: Config::default(),
            background: TaskTracker::new(),
        }
    }
}

impl std::fmt::Debug for Shared {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Shared")
            .field("config", &self.config)
            .finish_non_exhaustive()
    }
}
