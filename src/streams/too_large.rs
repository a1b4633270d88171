//! Records a destination can never take because of their size (over an MQTT packet limit,
//! IoT Hub's 256 KB, a webhook's 413 or a mail server's 552 for one record alone): removed
//! from the queue as `too_large` (`lorastream_queue_dropped_total{reason="too_large"}`) with a log
//! line, so that one record never blocks the ones behind it or is retried forever
//! (docs/reliability.md). The one way every stream kind drops such a record.
//!
//! Uplinks rarely get near a limit: the uplink stage keeps at most 32 receptions per uplink
//! (`uplink::MAX_RX_METADATA`), so an uplink's JSON stays within a few tens of kilobytes.

use super::StreamContext;
use crate::model::Record;
use crate::store::DropReason;

/// Remove `seq` (`r`, `size` bytes as the destination would get it, over `limit` when the
/// limit is known) from the queue as too large.
pub(crate) fn drop_record(
    ctx: &StreamContext,
    seq: u64,
    r: &Record,
    size: usize,
    limit: Option<usize>,
    what: &str,
) {
    // Data leaves the gateway here: every record gets its own line (they are rare: see above).
    tracing::warn!(stream = %ctx.name, seq, correlation_id = %r.correlation_id(), size, limit = ?limit,
        "record too large for {what}: dropped (lorastream_queue_dropped_total{{reason=\"too_large\"}})");
    if let Err(e) = ctx.queue.drop_undeliverable(seq, DropReason::TooLarge) {
        ctx.metrics.stream_error(&ctx.name, "queue_ack");
        tracing::error!(stream = %ctx.name, seq, error = %e, "cannot remove an undeliverable record");
    }
}

/// MQTT's remaining length of a QoS 1 PUBLISH (topic length, topic, packet id, payload): what
/// rumqttc compares with its packet limit (MQTT 3.1.1 §3.3).
pub(crate) fn mqtt_publish_size(topic: &str, payload: &[u8]) -> usize {
    2 + topic.len() + 2 + payload.len()
}
