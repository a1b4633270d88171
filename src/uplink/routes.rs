//! Which stream queues take which records: a device's uplinks and joins go to the streams whose
//! scope covers the device, a gateway's raw frames to the gateway-scoped streams.

use crate::model::{Eui64, Scope};
use crate::store::Store;
use std::sync::{Arc, RwLock};

/// Which queues take which records.
#[derive(Debug, Clone, Default)]
pub struct Routes {
    /// (scope, queue index in `Store::queues()`).
    routes: Vec<(Scope, usize)>,
}

impl Routes {
    /// `streams`: (name, scope) of every stream that takes records; indexes are the store's
    /// ([`Store::queue_index`]).
    pub fn new(store: &Store, streams: &[(String, Scope)]) -> Routes {
        let routes = streams
            .iter()
            .filter_map(|(name, scope)| store.queue_index(name).map(|i| (scope.clone(), i)))
            .collect();
        Routes { routes }
    }

    pub(super) fn for_device(&self, application: &str, device: &str, out: &mut Vec<usize>) {
        out.clear();
        out.extend(
            self.routes
                .iter()
                .filter(|(s, _)| s.covers(application, device))
                .map(|(_, i)| *i),
        );
    }

    pub(super) fn for_gateway(&self, gw: Eui64, out: &mut Vec<usize>) {
        out.clear();
        out.extend(
            self.routes
                .iter()
                .filter(|(s, _)| s.covers_gateway(gw))
                .map(|(_, i)| *i),
        );
    }

    pub(super) fn has_gateway_streams(&self) -> bool {
        self.routes
            .iter()
            .any(|(s, _)| matches!(s, Scope::Gateway(_)))
    }
}

/// The routes in effect, shared by the uplink stage and the daemon: a reload that adds,
/// changes or removes streams swaps them whole ([`SharedRoutes::set`]); the stage reads them
/// once per batch.
#[derive(Debug, Clone, Default)]
pub struct SharedRoutes(Arc<RwLock<Arc<Routes>>>);

impl SharedRoutes {
    pub fn get(&self) -> Arc<Routes> {
        self.0.read().unwrap_or_else(|p| p.into_inner()).clone()
    }

    pub fn set(&self, routes: Routes) {
        *self.0.write().unwrap_or_else(|p| p.into_inner()) = Arc::new(routes);
    }
}
