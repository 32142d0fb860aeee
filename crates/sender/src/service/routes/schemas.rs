//! Schemas the derive cannot say: the either/or rule of a packaging request, the operation
//! envelope's request per operation, and its answers per operation. They only document; the
//! handlers deserialize into the plain types and check the same rules.

use std::borrow::Cow;

use utoipa::openapi::schema::{
    AdditionalProperties, AllOfBuilder, AnyOfBuilder, ObjectBuilder, OneOfBuilder, Schema,
    SchemaType, Type,
};
use utoipa::openapi::{Ref, RefOr};
use utoipa::{PartialSchema, ToSchema};

use crate::service::metrics::MetricsSummary;
use crate::service::operations::{
    EventInput, PackageInput, PackageOutput, PublishedEvent, TransferInput, TransferReport,
};

type Schemas = Vec<(String, RefOr<Schema>)>;

/// Adds `T` and what it refers to.
fn collect<T: ToSchema>(schemas: &mut Schemas) {
    schemas.push((T::name().into(), T::schema()));
    T::schemas(schemas);
}

fn reference<T: ToSchema>() -> RefOr<Schema> {
    Ref::from_schema_name(T::name()).into()
}

fn null() -> ObjectBuilder {
    ObjectBuilder::new().schema_type(Type::Null)
}

fn string() -> ObjectBuilder {
    ObjectBuilder::new().schema_type(Type::String)
}

/// `PackageInput` with its rule: exactly one of `image` (package an existing image) and
/// `build_context` (build one; `dockerfile_path` only with it).
pub(super) struct PackageRequest;

impl PartialSchema for PackageRequest {
    fn schema() -> RefOr<Schema> {
        let existing = ObjectBuilder::new()
            .title(Some("existing image"))
            .required("image")
            .property("image", string().pattern(Some(r"\S")))
            .property("build_context", null())
            .property("dockerfile_path", null());
        let build = ObjectBuilder::new()
            .title(Some("build"))
            .required("build_context")
            .property("build_context", string())
            .property("image", null());
        // gzip takes levels 1-9 of the 1-19 `compression_level` allows.
        let not_gzip = ObjectBuilder::new().property(
            "compression",
            ObjectBuilder::new()
                .schema_type(SchemaType::from_iter([Type::String, Type::Null]))
                .enum_values(Some([Some("zstd"), Some("none"), None])),
        );
        let gzip_level = ObjectBuilder::new().property(
            "compression_level",
            ObjectBuilder::new()
                .schema_type(SchemaType::from_iter([Type::Integer, Type::Null]))
                .maximum(Some(9)),
        );
        AllOfBuilder::new()
            .description(Some(
                "Either `image` (package an existing local image) or `build_context` (build an \
                 image; with `dockerfile_path`, `image_tag`, `build_args`), not both.",
            ))
            .item(reference::<PackageInput>())
            .item(OneOfBuilder::new().item(existing).item(build))
            .item(AnyOfBuilder::new().item(not_gzip).item(gzip_level))
            .into()
    }
}

impl ToSchema for PackageRequest {
    fn name() -> Cow<'static, str> {
        Cow::Borrowed("PackageRequest")
    }

    fn schemas(schemas: &mut Schemas) {
        collect::<PackageInput>(schemas);
    }
}

/// `{"operation", "input", "correlation_id"}`, one shape per operation.
pub(super) struct ExecuteRequest;

impl PartialSchema for ExecuteRequest {
    fn schema() -> RefOr<Schema> {
        let shape = |operation: &str, input: Option<RefOr<Schema>>| {
            let correlation_id = ObjectBuilder::new()
                .schema_type(SchemaType::from_iter([Type::String, Type::Null]))
                .description(Some(
                    "Correlation id of the operation (default: `X-Correlation-Id`, or a new one).",
                ))
                .min_length(Some(1))
                .max_length(Some(128))
                .pattern(Some("^[!-~]+$"));
            let object = ObjectBuilder::new()
                .title(Some(operation))
                .property("operation", string().enum_values(Some([operation])))
                .required("operation")
                .property("correlation_id", correlation_id)
                .additional_properties(Some(AdditionalProperties::FreeForm(false)));
            match input {
                Some(input) => object.property("input", input).required("input"),
                // `get_metrics` takes no input and ignores one given.
                None => object.property(
                    "input",
                    ObjectBuilder::new()
                        .schema_type(SchemaType::AnyValue)
                        .description(Some("Ignored")),
                ),
            }
        };
        OneOfBuilder::new()
            .description(Some(
                "The operation and its input: `package_container` takes a `PackageRequest`, \
                 `transfer_package` a `TransferInput`, `publish_transfer_event` an `EventInput`, \
                 `get_metrics` nothing.",
            ))
            .item(shape(
                "package_container",
                Some(reference::<PackageRequest>()),
            ))
            .item(shape(
                "transfer_package",
                Some(reference::<TransferInput>()),
            ))
            .item(shape(
                "publish_transfer_event",
                Some(reference::<EventInput>()),
            ))
            .item(shape("get_metrics", None))
            .into()
    }
}

impl ToSchema for ExecuteRequest {
    fn name() -> Cow<'static, str> {
        Cow::Borrowed("ExecuteRequest")
    }

    fn schemas(schemas: &mut Schemas) {
        collect::<PackageRequest>(schemas);
        collect::<TransferInput>(schemas);
        collect::<EventInput>(schemas);
    }
}

/// The envelope's 200: `transfer_package`'s report or `get_metrics`' summary.
pub(super) struct ExecuteOk;

impl PartialSchema for ExecuteOk {
    fn schema() -> RefOr<Schema> {
        OneOfBuilder::new()
            .item(reference::<TransferReport>())
            .item(reference::<MetricsSummary>())
            .into()
    }
}

impl ToSchema for ExecuteOk {
    fn name() -> Cow<'static, str> {
        Cow::Borrowed("ExecuteOk")
    }

    fn schemas(schemas: &mut Schemas) {
        collect::<TransferReport>(schemas);
        collect::<MetricsSummary>(schemas);
    }
}

/// The envelope's 201: `package_container`'s package or `publish_transfer_event`'s event.
pub(super) struct ExecuteCreated;

impl PartialSchema for ExecuteCreated {
    fn schema() -> RefOr<Schema> {
        OneOfBuilder::new()
            .item(reference::<PackageOutput>())
            .item(reference::<PublishedEvent>())
            .into()
    }
}

impl ToSchema for ExecuteCreated {
    fn name() -> Cow<'static, str> {
        Cow::Borrowed("ExecuteCreated")
    }

    fn schemas(schemas: &mut Schemas) {
        collect::<PackageOutput>(schemas);
        collect::<PublishedEvent>(schemas);
    }
}

/// One server-sent event as a client's parser sees it: the event's name and its `data`, a JSON
/// document (`schema` of an OpenAPI 3.1 `text/event-stream` answer describes one event).
fn server_sent_event(names: &[&str], data: &str) -> RefOr<Schema> {
    ObjectBuilder::new()
        .property(
            "event",
            string()
                .enum_values(Some(names.iter().copied()))
                .description(Some(
                    "`error`: the event could not be rendered; `data` says why",
                )),
        )
        .required("event")
        .property(
            "data",
            string().description(Some(format!("{data}, as JSON text (`error`: a message)"))),
        )
        .required("data")
        .property("id", string())
        .property("retry", ObjectBuilder::new().schema_type(Type::Integer))
        .into()
}

/// An event of `GET /api/v1/jobs/{id}/events`.
pub(super) struct JobEvent;

impl PartialSchema for JobEvent {
    fn schema() -> RefOr<Schema> {
        server_sent_event(
            &["progress", "state", "finished", "error"],
            "`progress`: a `JobProgress`; `state` and `finished`: a `JobView`",
        )
    }
}

impl ToSchema for JobEvent {
    fn name() -> Cow<'static, str> {
        Cow::Borrowed("JobEvent")
    }
}

/// An event of `GET /api/v1/rollouts/{id}/events`.
pub(super) struct RolloutEvent;

impl PartialSchema for RolloutEvent {
    fn schema() -> RefOr<Schema> {
        server_sent_event(
            &["rollout", "finished", "error"],
            "`rollout` and `finished`: a `RolloutView`",
        )
    }
}

impl ToSchema for RolloutEvent {
    fn name() -> Cow<'static, str> {
        Cow::Borrowed("RolloutEvent")
    }
}
