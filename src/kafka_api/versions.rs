//! The one table of the Kafka APIs and versions this front end serves: the
//! ApiVersions answer is generated from it, and a request for anything
//! outside it is refused before it is dispatched, so the two cannot drift.

use kafka_protocol::messages::api_versions_response::ApiVersion;
use kafka_protocol::messages::{ApiKey, ApiVersionsResponse};

/// (API, lowest version, highest version).
pub(super) const SUPPORTED: &[(ApiKey, i16, i16)] = &[
    // Refused, but advertised: see `produce`.
    (ApiKey::Produce, 3, 9),
    (ApiKey::Fetch, 4, 12),
    (ApiKey::ListOffsets, 1, 7),
    (ApiKey::Metadata, 1, 12),
    (ApiKey::ApiVersions, 0, 3),
    (ApiKey::FindCoordinator, 0, 4),
    (ApiKey::JoinGroup, 0, 9),
    (ApiKey::SyncGroup, 0, 5),
    (ApiKey::Heartbeat, 0, 4),
    (ApiKey::LeaveGroup, 0, 5),
    (ApiKey::OffsetCommit, 2, 8),
    // v2+: v1 has no error code of its own, so a refused or failed
    // request would read as "no committed offsets".
    (ApiKey::OffsetFetch, 2, 7),
    (ApiKey::DescribeGroups, 0, 5),
    (ApiKey::ListGroups, 0, 4),
    // v0 would send the SASL token without Kafka framing.
    (ApiKey::SaslHandshake, 1, 1),
    (ApiKey::SaslAuthenticate, 0, 2),
];

/// The version range served for `key`, if it is served.
pub(super) fn range(key: ApiKey) -> Option<(i16, i16)> {
    SUPPORTED
        .iter()
        .find(|(k, _, _)| *k == key)
        .map(|(_, min, max)| (*min, *max))
}

/// Whether `key` at `version` is served.
pub(super) fn supported(key: ApiKey, version: i16) -> bool {
    range(key).is_some_and(|(min, max)| (min..=max).contains(&version))
}

/// The ApiVersions answer: every served API with its range; `error_code`
/// 35 (UNSUPPORTED_VERSION) when the client asked at a version we do not
/// serve (then it is sent in v0 form, which every client reads).
pub(super) fn api_versions(error_code: i16) -> ApiVersionsResponse {
    let mut response = ApiVersionsResponse::default();
    response.error_code = error_code;
    response.api_keys = SUPPORTED
        .iter()
        .map(|(key, min, max)| {
            let mut version = ApiVersion::default();
            version.api_key = *key as i16;
            version.min_version = *min;
            version.max_version = *max;
            version
        })
        .collect();
    response
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_table_is_within_what_the_codecs_know_and_lists_each_api_once() {
        for (key, min, max) in SUPPORTED {
            let known = key.valid_versions();
            assert!(
                known.min <= *min && *max <= known.max && min <= max,
                "{key:?} {min}..={max}"
            );
            assert_eq!(SUPPORTED.iter().filter(|(k, _, _)| k == key).count(), 1);
        }
        let answer = api_versions(0);
        assert_eq!(answer.api_keys.len(), SUPPORTED.len());
        assert!(supported(ApiKey::Fetch, 12));
        assert!(!supported(ApiKey::Fetch, 13));
        assert!(!supported(ApiKey::Produce, 2));
        assert!(!supported(ApiKey::OffsetDelete, 0));
    }
}
