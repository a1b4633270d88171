//! Which stream queues take which records: a device's uplinks and joins go to the streams whose
//! scope covers the device, a gateway's raw frames to the gateway-scoped streams.

use crate::model::{Eui64, Scope};
use crate::store::Store;

/// Which queues take which records.
#[derive(Debug, Clone, Default)]
pub struct Routes {
    /// (scope, queue index in `Store::queues()`).
    routes: Vec<(Scope, usize)>,
}

impl Routes {
    /// `streams`: (name, scope) of every stream; indexes follow the store's queue order.
    pub fn new(store: &Store, streams: &[(String, Scope)]) -> Routes {
        let queues = store.queues();
        let routes = streams
            .iter()
            .filter_map(|(name, scope)| {
                queues
                    .iter()
                    .position(|q| q.name() == name)
                    .map(|i| (scope.clone(), i))
            })
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
