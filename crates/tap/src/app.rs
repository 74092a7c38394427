//! Wiring: builds every component, creates every channel, spawns every task and owns the
//! shutdown order. Nothing else in the crate constructs stages or reads `Config` whole.

use std::future::Future;
use std::net::SocketAddr;
use std::sync::Arc;

use axum::{Router, routing::get};
use tokio::net::TcpListener;
use tokio::sync::{mpsc, watch};
use tokio_util::sync::CancellationToken;

use crate::api::{self, AdminAuth, ApiState};
use crate::config::{Config, DeliveryMode, listen_addr};
use crate::config::{JetstreamVerify, LiveSource};
use crate::crawler::{self, CrawlerSettings};
use crate::delivery::{DeliveryHub, nats, webhook};
use crate::error::AppError;
use crate::firehose::{self, FirehoseSettings};
use crate::identity::{Identity, IdentityOptions};
use crate::jetstream::{self, JetstreamSettings, prove::Prover};
use crate::ledger::Ledger;
use crate::live;
use crate::outbox::capacity::{Capacity, PAYLOAD_BUDGET};
use crate::outbox::{
    AckMode, Delivery, Finished, Input, Outbox, OutboxSettings, acks, loader, scheduler,
};
use crate::repos::engine::Engine;
use crate::repos::filter::Scope;
use crate::repos::live_filters::FilterControl;
use crate::repos::locks::DidLocks;
use crate::resync::{self, ResyncSettings};
use crate::shutdown::{self, Shutdown, Supervisor};
use crate::status::board::{BoardSources, StatusBoard};
use crate::status::{self, Progress};
use crate::store::{Store, StoreOptions};
use crate::telemetry;

/// Capacity of the outbox actor's input channel.
const ACTOR_INPUTS: usize = 4096;
/// Capacity of the channel of acked ids on their way to the deleter.
const ACKED_QUEUE: usize = 1024;

/// The outbox's channel ends, created at bind time so producers and tests can hold an
/// [`Outbox`] before the tasks run.
struct OutboxParts {
    handle: Outbox,
    capacity: Capacity,
    inputs_tx: mpsc::Sender<Input>,
    inputs_rx: mpsc::Receiver<Input>,
    queue_tx: async_channel::Sender<Delivery>,
    queue_rx: async_channel::Receiver<Delivery>,
    acked_tx: mpsc::Sender<Finished>,
    acked_rx: mpsc::Receiver<Finished>,
    ready_tx: watch::Sender<bool>,
    settings: OutboxSettings,
}

impl OutboxParts {
    fn new(config: &Config, store: &Store) -> Self {
        let ack_mode = match config.delivery {
            DeliveryMode::WebSocketAck => AckMode::ClientAck,
            DeliveryMode::FireAndForget => AckMode::OnWrite,
            DeliveryMode::Webhook { .. } | DeliveryMode::Nats(_) => AckMode::Sink,
        };
        let settings = OutboxSettings {
            capacity: config.outbox_capacity,
            ack_mode,
            retry_timeout: config.retry_timeout,
        };
        let capacity = Capacity::new(settings.capacity, PAYLOAD_BUDGET);
        let (inputs_tx, inputs_rx) = mpsc::channel(ACTOR_INPUTS);
        let (queue_tx, queue_rx) = async_channel::bounded(scheduler::DELIVERY_QUEUE);
        let (acked_tx, acked_rx) = mpsc::channel(ACKED_QUEUE);
        let (ready_tx, ready_rx) = watch::channel(false);
        let handle = Outbox::new(store.clone(), capacity.clone(), inputs_tx.clone(), ready_rx);
        Self {
            handle,
            capacity,
            inputs_tx,
            inputs_rx,
            queue_tx,
            queue_rx,
            acked_tx,
            acked_rx,
            ready_tx,
            settings,
        }
    }
}

/// A tap whose listeners are bound and whose database is open, ready to [`run`](Self::run).
pub struct App {
    config: Config,
    store: Store,
    http: TcpListener,
    metrics: Option<TcpListener>,
    progress: Arc<Progress>,
    outbox: OutboxParts,
    identity: Identity,
    ledger: Ledger,
    filters: Arc<FilterControl>,
}

impl App {
    /// Opens the store (applying migrations), recovers interrupted work, and binds the HTTP
    /// and metrics listeners, so every start-up failure surfaces here, before anything runs.
    ///
    /// # Errors
    /// [`AppError::Store`] if the database cannot be opened; [`AppError::Bind`] if a
    /// listener cannot be bound; [`AppError::Identity`] if the identity resolver cannot be
    /// built.
    pub async fn bind(config: Config) -> Result<Self, AppError> {
        let http = bind_listener("http", &config.bind).await?;
        let metrics = match &config.metrics_listen {
            Some(addr) => Some(bind_listener("metrics", addr).await?),
            None => None,
        };
        let store = Store::open(
            &config.database,
            StoreOptions {
                max_pg_conns: config.max_db_conns,
                ..StoreOptions::default()
            },
        )
        .await?;
        // A first backfill whose in-memory events may not all have been acked runs again
        // from scratch (store::EventStorage::InMemoryBackfill). Not in outbox-only mode:
        // the producing process owns its repos.
        if !config.outbox_only {
            let rerun = store.reset_undelivered_backfills().await?;
            if rerun > 0 {
                tracing::info!(
                    repos = rerun,
                    "Backfills whose events were not all acked before the last stop will run again."
                );
            }
        }
        // A resync interrupted by a crash starts over (original-behaviour §5).
        let reset = store.reset_resyncing().await?;
        if reset > 0 {
            tracing::info!(
                repos = reset,
                "Reset interrupted resyncs to desynchronized."
            );
        }
        // The filters in force: the flags', or the values set through the API since.
        let filters = Arc::new(
            FilterControl::load(
                store.clone(),
                &Scope::new(config.scope.clone(), config.collection_filters.clone())
                    .with_rules(config.record_filters.clone()),
            )
            .await?,
        );
        let outbox = OutboxParts::new(&config, &store);
        let ledger = Ledger::default();
        let identity = Identity::new(IdentityOptions {
            handle_resolver: config.handle_resolver_url.clone(),
            ledger: ledger.clone(),
            allow_private_network: config.allow_private_network,
            ..IdentityOptions::new(config.plc_url.clone(), config.ident_cache_size)
        })?;
        Ok(Self {
            config,
            store,
            http,
            metrics,
            progress: Arc::new(Progress::default()),
            outbox,
            identity,
            ledger,
            filters,
        })
    }

    /// The producers' handle on the outbox (the sync engine's way in; tests use it too).
    #[must_use]
    pub fn outbox(&self) -> Outbox {
        self.outbox.handle.clone()
    }

    /// The bound address of the HTTP API.
    ///
    /// # Errors
    /// The OS could not report the address.
    pub fn local_addr(&self) -> std::io::Result<SocketAddr> {
        self.http.local_addr()
    }

    /// The bound address of the metrics server, if enabled.
    #[must_use]
    pub fn metrics_addr(&self) -> Option<SocketAddr> {
        self.metrics.as_ref().and_then(|l| l.local_addr().ok())
    }

    /// A handle on the store (for tests and tools).
    #[must_use]
    pub fn store(&self) -> &Store {
        &self.store
    }

    /// Runs until `shutdown_signal` resolves, a server fails or a task ends unexpectedly,
    /// then shuts down in order: stop intake, stop HTTP and delivery sessions, stop the
    /// outbox actor, flush acked deletions and close the store, each bounded by a deadline.
    ///
    /// # Errors
    /// [`AppError::Serve`] if a server fails while running; [`AppError::Task`] if a task
    /// panicked or stopped on its own; [`AppError::HttpClient`] or [`AppError::Store`] if
    /// a client cannot be built or the cursor read, before anything starts.
    pub async fn run(
        self,
        shutdown_signal: impl Future<Output = ()> + Send,
    ) -> Result<(), AppError> {
        let Self {
            config,
            store,
            http,
            metrics,
            progress,
            outbox,
            identity,
            ledger,
            filters,
        } = self;
        // Everything that can fail before a task runs, so a failure here leaves nothing
        // half started.
        let webhook_client = match &config.delivery {
            DeliveryMode::Webhook { .. } => {
                Some(webhook::client().map_err(|e| AppError::HttpClient {
                    what: "webhook delivery",
                    reason: e.to_string(),
                })?)
            }
            _ => None,
        };
        let nats_sink = match &config.delivery {
            DeliveryMode::Nats(target) => Some((nats::connect(target).await?, target)),
            _ => None,
        };
        let firehose_settings = FirehoseSettings {
            relay_url: config.relay_url.clone(),
            no_replay: config.no_replay,
            parallelism: config.firehose_parallelism,
            cursor_save_interval: config.cursor_save_interval,
        };
        let sync_parts = if config.outbox_only {
            None
        } else {
            let pds = resync::fetch::PdsClient::new(
                config.repo_fetch_timeout,
                config.repo_fetch_min_rate,
                ledger.clone(),
                config.allow_private_network,
            )
            .map_err(|e| AppError::HttpClient {
                what: "resync",
                reason: e.to_string(),
            })?;
            let start = match &config.live_source {
                LiveSource::Relay => firehose::start_cursor(&firehose_settings, &store).await?,
                LiveSource::Jetstream(js) => {
                    live::start_cursor(&store, js.url.as_str(), config.no_replay).await?
                }
            };
            Some((Arc::new(pds), start))
        };

        let shutdown = Shutdown::new();
        // Producers (firehose, resync, crawler) stop first; delivery keeps running until
        // they have drained, so what they committed can still go out.
        let intake = shutdown.token().child_token();
        let delivery_stop = CancellationToken::new();
        let delivery_tasks = tokio_util::task::TaskTracker::new();
        // Tasks may end once intake stops; before that, an end is a failure.
        let supervisor = Supervisor::new(shutdown.tracker().clone(), intake.clone());
        let delivery_supervisor = supervisor.with_tracker(delivery_tasks.clone());
        let addr = http
            .local_addr()
            .map_or_else(|_| config.bind.clone(), |a| a.to_string());
        tracing::info!(
            env = %config.env_name,
            %addr,
            delivery = config.delivery.name(),
            outbox_only = config.outbox_only,
            "Starting tap."
        );
        if open_to_other_hosts(http.local_addr().ok(), config.admin_password.is_some()) {
            // The Go tap's defaults, kept for compatibility, but never silently.
            tracing::warn!(
                %addr,
                "The API (/channel, /repos/*) answers other hosts and no admin password is set: anyone who can reach it can read and ack events and change what is tracked. Set --admin-password or bind to 127.0.0.1."
            );
        }

        // Outbox: actor, deleter, backlog loader.
        let OutboxParts {
            handle: outbox_handle,
            capacity,
            inputs_tx,
            inputs_rx,
            queue_tx,
            queue_rx,
            acked_tx,
            acked_rx,
            ready_tx,
            settings,
        } = outbox;
        let actor = scheduler::Actor::new(
            settings,
            inputs_rx,
            queue_tx,
            acked_tx,
            capacity.clone(),
            Arc::clone(&progress),
        );
        let actor_task =
            tokio::spawn(supervisor.watch("outbox actor", true, actor.run(delivery_stop.clone())));
        let deleter_task = tokio::spawn(supervisor.watch(
            "ack deleter",
            true,
            acks::run_deleter(store.clone(), acked_rx),
        ));
        let loader = loader::run_loader(
            store.clone(),
            inputs_tx.clone(),
            capacity,
            ready_tx,
            config.outbox_only,
            intake.clone(),
        );
        // With --outbox-only it follows the table for good (the only producer); otherwise
        // it ends once the backlog is loaded.
        if config.outbox_only {
            supervisor.spawn("outbox loader", loader);
        } else {
            supervisor.spawn_finite("outbox loader", loader);
        }

        let hub = DeliveryHub {
            queue: queue_rx,
            inputs: inputs_tx,
            ack_mode: settings.ack_mode,
            channel_timeout: config.channel_timeout,
            progress: Arc::clone(&progress),
        };
        let channel = match (&config.delivery, &webhook_client) {
            (DeliveryMode::Webhook { url }, Some(client)) => {
                let settings = webhook::WebhookSettings {
                    url: url.clone(),
                    // The signature proves the sender; with a secret, the password that
                    // opens tap's API is not handed to the receiver too.
                    authorization: match (&config.webhook_secret, &config.admin_password) {
                        (None, Some(p)) => Some(api::basic_header("admin", p)),
                        _ => None,
                    },
                    secret: config.webhook_secret.clone(),
                    parallelism: config.webhook_parallelism,
                };
                webhook::spawn(
                    &settings,
                    client,
                    &hub,
                    &delivery_supervisor,
                    &delivery_stop,
                );
                None
            }
            (DeliveryMode::Nats(_), _) => {
                if let Some((context, target)) = &nats_sink {
                    nats::spawn(context, target, &hub, &delivery_supervisor, &delivery_stop);
                }
                None
            }
            _ => Some(hub),
        };

        // The sync engine: firehose, resync workers, crawler (not in outbox-only mode).
        let mut firehose_handle = None;
        if let Some((pds, start)) = sync_parts {
            let engine = Engine::new(
                store.clone(),
                outbox_handle,
                identity.clone(),
                filters.live().clone(),
                DidLocks::new(),
                ledger.clone(),
            );
            resync::spawn(
                &ResyncSettings {
                    parallelism: config.resync_parallelism,
                    per_host: config.resync_parallelism_per_host,
                    fetch_timeout: config.repo_fetch_timeout,
                    max_repo_bytes: config.max_repo_bytes,
                    spill_budget: tap_atproto::stream::SpillBudget::new(config.max_spill_bytes),
                    fetch_strategy: config.fetch_strategy,
                    // JetStream drops a republished event by its id, so in NATS mode
                    // every event is stored first and keeps its id across a crash.
                    in_memory_backfill: !config.durable_backfill_events
                        && !matches!(config.delivery, DeliveryMode::Nats(_)),
                },
                Arc::clone(&pds),
                engine.clone(),
                store.clone(),
                &progress,
                &supervisor,
                intake.clone(),
            );
            supervisor.spawn_finite(
                "crawler",
                crawler::run_crawler(
                    CrawlerSettings {
                        relay_url: config.relay_url.clone(),
                        light_rail_url: config.light_rail_url.clone(),
                        scope: filters.live().clone(),
                        ledger: ledger.clone(),
                        progress: Arc::clone(&progress),
                    },
                    store.clone(),
                    intake.clone(),
                ),
            );
            firehose_handle = Some(match &config.live_source {
                LiveSource::Relay => firehose::spawn(
                    firehose_settings,
                    start,
                    engine,
                    store.clone(),
                    Arc::clone(&progress),
                    &supervisor,
                    intake.clone(),
                ),
                LiveSource::Jetstream(js) => {
                    let prover = (js.verify == JetstreamVerify::Proof).then(|| {
                        Arc::new(Prover::new(
                            Arc::clone(&pds),
                            identity.clone(),
                            js.proof_rate,
                        ))
                    });
                    jetstream::spawn(
                        JetstreamSettings {
                            config: js.clone(),
                            parallelism: config.firehose_parallelism,
                            cursor_save_interval: config.cursor_save_interval,
                        },
                        start,
                        engine,
                        prover,
                        store.clone(),
                        Arc::clone(&progress),
                        &supervisor,
                        intake.clone(),
                    )
                }
            });
        }

        let board = Arc::new(StatusBoard::new(BoardSources {
            store: store.clone(),
            progress: Arc::clone(&progress),
            ledger: ledger.clone(),
            failure: supervisor.subscribe(),
            upstream: match &config.live_source {
                LiveSource::Relay => config.relay_url.to_string(),
                LiveSource::Jetstream(js) => js.url.to_string(),
            },
            follows_firehose: !config.outbox_only,
            delivery: config.delivery.name(),
            workers: config.resync_parallelism,
        }));
        supervisor.spawn(
            "status sampler",
            status::board::run_sampler(Arc::clone(&board), intake.clone()),
        );
        let state = ApiState {
            store: store.clone(),
            progress,
            board,
            relay_url: config.relay_url.to_string(),
            light_rail_url: config.light_rail_url.as_ref().map(ToString::to_string),
            live_cursor: match config.live_source {
                LiveSource::Relay => "firehose",
                LiveSource::Jetstream(_) => "jetstream",
            },
            live_unverified: matches!(
                &config.live_source,
                LiveSource::Jetstream(js) if js.verify == JetstreamVerify::None
            ),
            filters,
            channel,
            stop: delivery_stop.clone(),
            channel_slots: Arc::new(tokio::sync::Semaphore::new(config.max_channel_sessions)),
            max_channel_sessions: config.max_channel_sessions,
            identity,
            ledger,
            failure: supervisor.subscribe(),
        };
        let auth = config.admin_password.clone().map(AdminAuth::new);
        let api = api::router(state, auth.clone());

        let mut servers = tokio::task::JoinSet::new();
        let mut server_names = std::collections::HashMap::new();
        let limits = config.http_limits;
        let id = servers
            .spawn(api::server::serve(http, api, limits, delivery_stop.clone()))
            .id();
        server_names.insert(id, "http");
        if let Some(listener) = metrics {
            let handle = telemetry::metrics_handle();
            // Metrics tell a lot about what tap holds: with an admin password set, they
            // need it too (the Go tap's metrics server had no auth at all).
            let router = Router::new()
                .route(
                    "/metrics",
                    get(move || {
                        let handle = handle.clone();
                        async move { handle.render() }
                    }),
                )
                .layer(axum::middleware::from_fn_with_state(
                    auth,
                    api::require_admin,
                ));
            let id = servers
                .spawn(api::server::serve(
                    listener,
                    router,
                    limits,
                    delivery_stop.clone(),
                ))
                .id();
            server_names.insert(id, "metrics");
        }

        let mut failure = None;
        tokio::select! {
            () = shutdown_signal => tracing::info!("Shutdown requested."),
            failed = supervisor.failed() => failure = Some(AppError::Task(failed)),
            Some(result) = servers.join_next_with_id() => {
                // Servers run until delivery stops, which has not happened yet.
                let (id, reason) = match result {
                    Ok((id, ())) => (id, "stopped on its own".to_owned()),
                    Err(join) => (join.id(), join.to_string()),
                };
                let what = server_names.get(&id).copied().unwrap_or("http");
                failure = Some(AppError::Serve { what, reason });
            }
        }

        // 1. Stop intake and let producers finish what they started.
        intake.cancel();
        if !shutdown.wait_tasks(shutdown::DRAIN_DEADLINE).await {
            tracing::warn!("Some tasks did not finish before the drain deadline.");
        }
        // The firehose's last cursor save covers everything its workers finished.
        if let Some(handle) = firehose_handle
            && tokio::time::timeout(shutdown::FLUSH_DEADLINE, handle.flush())
                .await
                .is_err()
        {
            tracing::error!("The firehose cursor was not saved before the flush deadline.");
        }
        // 2. Stop delivery: sessions drop their connections (no close frame), servers stop.
        delivery_stop.cancel();
        if tokio::time::timeout(shutdown::DRAIN_DEADLINE, async {
            while servers.join_next().await.is_some() {}
        })
        .await
        .is_err()
        {
            tracing::warn!("HTTP connections still open after the drain deadline; closing them.");
            servers.abort_all();
        }
        delivery_tasks.close();
        if tokio::time::timeout(shutdown::DRAIN_DEADLINE, delivery_tasks.wait())
            .await
            .is_err()
        {
            tracing::warn!("Delivery workers did not stop before the drain deadline.");
        }
        // 3. The actor forwards the last acks and exits; the deleter then flushes and exits,
        //    under the flush deadline (never the cancelled token).
        let _ = actor_task.await;
        if tokio::time::timeout(shutdown::FLUSH_DEADLINE, deleter_task)
            .await
            .is_err()
        {
            tracing::error!(
                "Acked events were not all deleted before the flush deadline; they will be redelivered."
            );
        }
        shutdown.trigger();
        if tokio::time::timeout(shutdown::FLUSH_DEADLINE, store.close())
            .await
            .is_err()
        {
            tracing::error!("The store did not close before the flush deadline.");
        }
        tracing::info!("Tap stopped.");
        failure.map_or(Ok(()), Err)
    }
}

/// Whether the API, bound to `addr`, answers other hosts while no admin password guards it.
fn open_to_other_hosts(addr: Option<std::net::SocketAddr>, has_password: bool) -> bool {
    !has_password && addr.is_some_and(|a| !a.ip().is_loopback())
}

async fn bind_listener(what: &'static str, addr: &str) -> Result<TcpListener, AppError> {
    TcpListener::bind(listen_addr(addr))
        .await
        .map_err(|source| AppError::Bind {
            what,
            addr: addr.to_owned(),
            source,
        })
}

#[cfg(test)]
mod tests {
    use super::open_to_other_hosts;

    #[test]
    fn an_api_on_every_interface_without_a_password_is_open_to_other_hosts() {
        let at = |s: &str| Some(s.parse().unwrap());
        assert!(open_to_other_hosts(at("0.0.0.0:2480"), false));
        assert!(open_to_other_hosts(at("[::]:2480"), false));
        assert!(open_to_other_hosts(at("192.168.1.5:2480"), false));
        assert!(
            !open_to_other_hosts(at("0.0.0.0:2480"), true),
            "a password guards it"
        );
        assert!(!open_to_other_hosts(at("127.0.0.1:2480"), false));
        assert!(!open_to_other_hosts(at("[::1]:2480"), false));
    }
}
