//! `/api/events/list` in dstack's shapes: its `ListEventsRequest` read into an
//! [`EventQuery`], and [`Event`]s written as dstack's `Event`.

use serde::Deserialize;
use serde_json::{json, Value};

use super::{dstack_id, iso_time, parse_iso_time, Owner, RequestError};
use crate::events::{
    dstack_event_id, parse_dstack_event_id, Event, EventQuery, RecordRef, TargetType,
};

/// The fields of dstack's `ListEventsRequest` (ids are dstack's UUIDs).
#[derive(Clone, Debug, Default, Deserialize)]
#[serde(default)]
pub struct ListEventsRequest {
    /// Events about these projects.
    pub target_projects: Option<Vec<String>>,
    /// Events about these users.
    pub target_users: Option<Vec<String>>,
    /// Events about these fleets.
    pub target_fleets: Option<Vec<String>>,
    /// Events about these instances.
    pub target_instances: Option<Vec<String>>,
    /// Events about these runs.
    pub target_runs: Option<Vec<String>>,
    /// Events about these jobs.
    pub target_jobs: Option<Vec<String>>,
    /// Events about these volumes.
    pub target_volumes: Option<Vec<String>>,
    /// Events about these gateways.
    pub target_gateways: Option<Vec<String>>,
    /// Events about these gateway replicas.
    pub target_gateway_replicas: Option<Vec<String>>,
    /// Events about these secrets.
    pub target_secrets: Option<Vec<String>>,
    /// Events about these presets.
    pub target_presets: Option<Vec<String>>,
    /// Events within these projects.
    pub within_projects: Option<Vec<String>>,
    /// Events about these fleets or their instances.
    pub within_fleets: Option<Vec<String>>,
    /// Events about these runs or their jobs.
    pub within_runs: Option<Vec<String>>,
    /// Events about these gateways or their replicas.
    pub within_gateways: Option<Vec<String>>,
    /// Only events about records of these types.
    pub include_target_types: Option<Vec<String>>,
    /// Only events these users caused (`null`: the system).
    pub actors: Option<Vec<Option<String>>>,
    /// Events after (ascending) or before this time.
    pub prev_recorded_at: Option<String>,
    /// Events after (ascending) or before this event.
    pub prev_id: Option<String>,
    /// At most this many.
    pub limit: Option<usize>,
    /// Oldest first.
    pub ascending: bool,
}

/// What a [`ListEventsRequest`] asks for.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum EventsAsked {
    /// These events.
    Query(EventQuery),
    /// None can match: the request names records this project records no events of (users,
    /// gateways, secrets, presets, another project) or events users caused (every event here
    /// is the system's).
    Nothing,
}

/// Reads `request`: `ours` maps a dstack UUID of a run, fleet, instance or volume to its id
/// here (`None`: no such record, so no event can match it); `project_id` is the dstack UUID
/// of this server's project.
pub fn events_query(
    request: &ListEventsRequest,
    project_id: &str,
    ours: impl Fn(&str) -> Option<String>,
) -> Result<EventsAsked, RequestError> {
    if request.target_jobs.is_some() {
        return Err(RequestError::Unsupported(vec![
            "target_jobs: jobs are found by their run here (within_runs)".to_string(),
        ]));
    }
    let never_recorded = [
        &request.target_projects,
        &request.target_users,
        &request.target_gateways,
        &request.target_gateway_replicas,
        &request.target_secrets,
        &request.target_presets,
        &request.within_gateways,
    ];
    let only_targets_never_recorded = never_recorded.iter().any(|f| f.is_some())
        && [
            &request.target_fleets,
            &request.target_instances,
            &request.target_runs,
            &request.target_volumes,
        ]
        .iter()
        .all(|f| f.is_none());
    let other_project = request
        .within_projects
        .as_ref()
        .is_some_and(|ids| !ids.iter().any(|id| id == project_id));
    let users_only = request
        .actors
        .as_ref()
        .is_some_and(|actors| actors.iter().all(Option::is_some));
    if only_targets_never_recorded || other_project || users_only {
        return Ok(EventsAsked::Nothing);
    }
    let mut types = Vec::new();
    for name in request.include_target_types.iter().flatten() {
        types.push(TargetType::parse(name).ok_or_else(|| {
            RequestError::Invalid(format!("include_target_types: unknown type {name}"))
        })?);
    }
    let ids = |field: &Option<Vec<String>>| -> Vec<String> {
        field.iter().flatten().filter_map(|id| ours(id)).collect()
    };
    let targets: Vec<String> = [
        &request.target_fleets,
        &request.target_instances,
        &request.target_runs,
        &request.target_volumes,
    ]
    .into_iter()
    .flat_map(ids)
    .collect();
    let within: Vec<RecordRef> = [
        (TargetType::Run, &request.within_runs),
        (TargetType::Fleet, &request.within_fleets),
    ]
    .into_iter()
    .flat_map(|(kind, field)| ids(field).into_iter().map(move |id| RecordRef { kind, id }))
    .collect();
    let asked_targets = [
        &request.target_fleets,
        &request.target_instances,
        &request.target_runs,
        &request.target_volumes,
    ]
    .iter()
    .any(|f| f.is_some());
    let asked_within = request.within_runs.is_some() || request.within_fleets.is_some();
    if (asked_targets && targets.is_empty()) || (asked_within && within.is_empty()) {
        return Ok(EventsAsked::Nothing);
    }
    let after = match &request.prev_id {
        Some(id) => Some(
            parse_dstack_event_id(id)
                .ok_or_else(|| RequestError::Invalid(format!("prev_id: no event has id {id}")))?,
        ),
        None => None,
    };
    let prev_time = match &request.prev_recorded_at {
        Some(text) => Some(parse_iso_time(text).ok_or_else(|| {
            RequestError::Invalid(format!("prev_recorded_at: not a time: {text}"))
        })?),
        None => None,
    };
    Ok(EventsAsked::Query(EventQuery {
        targets,
        within,
        types,
        // Events are numbered in the order of their times: after an event, its number
        // says it all; without one, a time starts an ascending listing.
        since_ms: prev_time.filter(|_| after.is_none() && request.ascending),
        after,
        limit: request.limit.unwrap_or(crate::events::DEFAULT_LIMIT),
        ascending: request.ascending,
    }))
}

/// `event` as dstack's `Event`.
pub fn event(event: &Event, owner: &Owner<'_>) -> Value {
    json!({
        "id": dstack_event_id(event.id),
        "message": event.message(),
        "recorded_at": iso_time(event.recorded_at_ms),
        "actor_user_id": null,
        "actor_user": null,
        "is_actor_user_deleted": null,
        "targets": [{
            "type": event.target.kind.as_str(),
            "project_id": dstack_id(owner.project_name),
            "project_name": owner.project_name,
            "is_project_deleted": false,
            "id": dstack_id(&event.target.id),
            "name": event.target.name,
        }],
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn ours(id: &str) -> Option<String> {
        (id != "missing").then(|| format!("ours-{id}"))
    }

    fn query(request: ListEventsRequest) -> EventsAsked {
        events_query(&request, "project", ours).unwrap()
    }

    #[test]
    fn dstacks_filters_become_a_query_of_our_records() {
        let asked = query(ListEventsRequest {
            within_runs: Some(vec!["r".into()]),
            include_target_types: Some(vec!["job".into()]),
            within_projects: Some(vec!["project".into()]),
            prev_recorded_at: Some("2026-12-07T10:00:00Z".into()),
            ascending: true,
            ..Default::default()
        });
        let EventsAsked::Query(q) = asked else {
            panic!("{asked:?}")
        };
        assert_eq!(q.within[0].id, "ours-r");
        assert_eq!(q.within[0].kind, TargetType::Run);
        assert_eq!(q.types, vec![TargetType::Job]);
        assert!(q.since_ms.is_some());
        assert_eq!(q.limit, 100);

        let next = query(ListEventsRequest {
            prev_id: Some(dstack_event_id(41)),
            prev_recorded_at: Some("2026-12-07T10:00:00Z".into()),
            ascending: true,
            ..Default::default()
        });
        let EventsAsked::Query(q) = next else {
            panic!()
        };
        assert_eq!((q.after, q.since_ms), (Some(41), None));
    }

    #[test]
    fn filters_nothing_here_can_match_ask_for_nothing() {
        for request in [
            ListEventsRequest {
                target_users: Some(vec!["u".into()]),
                ..Default::default()
            },
            ListEventsRequest {
                within_projects: Some(vec!["another".into()]),
                ..Default::default()
            },
            ListEventsRequest {
                actors: Some(vec![Some("u".into())]),
                ..Default::default()
            },
            ListEventsRequest {
                target_runs: Some(vec!["missing".into()]),
                ..Default::default()
            },
        ] {
            assert_eq!(query(request), EventsAsked::Nothing);
        }
        let bad_type = ListEventsRequest {
            include_target_types: Some(vec!["runs".into()]),
            ..Default::default()
        };
        assert!(events_query(&bad_type, "project", ours).is_err());
    }
}
