//! `shopctl`: dead letters and invariant checks from the command line.
//!
//! ```text
//! shopctl dlq list orders            # what payment/inventory dead-lettered
//! shopctl dlq replay orders          # send them back once fixed
//! shopctl check                      # invariants across DBs and topics
//! shopctl broker show                # Kafka cluster of the broker and of each DB
//! shopctl broker accept              # move the databases to a new cluster
//! ```
//! Kafka settings come from the same variables as the services
//! (`KAFKA_BROKERS`, `KAFKA_TOPIC_PREFIX`).

use clap::{Parser, Subcommand};
use common::config::KafkaConfig;
use sqlx::PgPool;

#[derive(Parser)]
#[command(
    version,
    about = "Operate the order pipeline: dead letters, invariant checks, Kafka cluster changes"
)]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand)]
enum Command {
    /// Dead-letter topics (`<topic>.dlq`).
    Dlq {
        #[command(subcommand)]
        action: DlqAction,
    },
    /// Check the pipeline's invariants; exits 1 if any is violated.
    Check {
        #[command(flatten)]
        databases: Databases,
    },
    /// The Kafka cluster each service's database belongs with.
    Broker {
        #[command(subcommand)]
        action: BrokerAction,
    },
}

/// The three services' databases. `--help` shows the local defaults but
/// never the URLs set in the environment: they carry passwords.
#[derive(clap::Args)]
#[allow(clippy::struct_field_names)] // the field names are the flags: --orders-db, ...
struct Databases {
    #[arg(
        long,
        env = "ORDERS_DATABASE_URL",
        hide_env_values = true,
        default_value = "postgres://shop:shop@127.0.0.1:5432/orders"
    )]
    orders_db: String,
    #[arg(
        long,
        env = "PAYMENTS_DATABASE_URL",
        hide_env_values = true,
        default_value = "postgres://shop:shop@127.0.0.1:5432/payments"
    )]
    payments_db: String,
    #[arg(
        long,
        env = "INVENTORY_DATABASE_URL",
        hide_env_values = true,
        default_value = "postgres://shop:shop@127.0.0.1:5432/inventory"
    )]
    inventory_db: String,
}

impl Databases {
    async fn connect(&self) -> anyhow::Result<(PgPool, PgPool, PgPool)> {
        Ok((
            PgPool::connect(&self.orders_db).await?,
            PgPool::connect(&self.payments_db).await?,
            PgPool::connect(&self.inventory_db).await?,
        ))
    }
}

#[derive(Subcommand)]
enum BrokerAction {
    /// Print the broker's cluster id and the one each database recorded.
    Show {
        #[command(flatten)]
        databases: Databases,
    },
    /// Accept the broker's cluster for every database: republish the
    /// outbox rows still kept, reset the consumer groups' offsets on it to
    /// the earliest. Run it while the services refuse to start.
    Accept {
        #[command(flatten)]
        databases: Databases,
        /// The services' consumer groups (their `KAFKA_GROUP_ID`).
        #[arg(long, default_value = "order")]
        order_group: String,
        #[arg(long, default_value = "payment")]
        payment_group: String,
        #[arg(long, default_value = "inventory")]
        inventory_group: String,
    },
}

#[derive(Subcommand)]
enum DlqAction {
    /// Print every dead letter of a topic as JSON lines.
    List {
        /// orders, payments or inventory
        topic: String,
    },
    /// Republish dead letters not replayed before to their source topic.
    Replay {
        topic: String,
        /// Consumer group that remembers what was replayed.
        #[arg(long, default_value = "shopctl-dlq-replay")]
        group: String,
    },
}

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    let cli = Cli::parse();
    let kafka = KafkaConfig::from_env("shopctl")?;
    match cli.command {
        Command::Dlq {
            action: DlqAction::List { topic },
        } => {
            let letters = shopctl::dlq::list(&kafka, &topic)?;
            for letter in &letters {
                println!("{}", serde_json::to_string(letter)?);
            }
            eprintln!(
                "{} dead letters on {}",
                letters.len(),
                common::topics::dlq(&kafka.topic(&topic))
            );
        }
        Command::Dlq {
            action: DlqAction::Replay { topic, group },
        } => {
            let n = shopctl::dlq::replay(&kafka, &topic, &group).await?;
            eprintln!("replayed {n} dead letters to {}", kafka.topic(&topic));
        }
        Command::Check { databases } => {
            let (orders, payments, inventory) = databases.connect().await?;
            let sources = shopctl::invariants::Sources {
                orders,
                payments,
                inventory,
                kafka,
            };
            let report = shopctl::invariants::check(&sources).await?;
            println!("{}", serde_json::to_string_pretty(&report)?);
            if !report.ok() {
                std::process::exit(1);
            }
        }
        Command::Broker {
            action: BrokerAction::Show { databases },
        } => {
            let (orders, payments, inventory) = databases.connect().await?;
            let groups = ["order", "payment", "inventory"].map(str::to_owned);
            let dbs = shopctl::broker::services(orders, payments, inventory, groups);
            let status = shopctl::broker::show(&kafka, &dbs).await?;
            println!("{}", serde_json::to_string_pretty(&status)?);
        }
        Command::Broker {
            action:
                BrokerAction::Accept {
                    databases,
                    order_group,
                    payment_group,
                    inventory_group,
                },
        } => {
            let (orders, payments, inventory) = databases.connect().await?;
            let groups = [order_group, payment_group, inventory_group];
            let dbs = shopctl::broker::services(orders, payments, inventory, groups);
            for done in shopctl::broker::accept(&kafka, &dbs).await? {
                println!("{}", serde_json::to_string(&done)?);
                eprintln!(
                    "{}: now cluster {} (was {}); {} outbox rows will be republished; \
                     {} partition offsets reset to the earliest",
                    done.service,
                    done.accepted.cluster_id,
                    done.accepted.previous.as_deref().unwrap_or("none"),
                    done.accepted.republished,
                    done.offsets_reset
                );
            }
        }
    }
    Ok(())
}
