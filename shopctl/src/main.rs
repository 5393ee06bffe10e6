//! `shopctl`: dead letters and invariant checks from the command line.
//!
//! ```text
//! shopctl dlq list orders            # what payment/inventory dead-lettered
//! shopctl dlq replay orders          # send them back once fixed
//! shopctl check                      # invariants across DBs and topics
//! ```
//! Kafka settings come from the same variables as the services
//! (`KAFKA_BROKERS`, `KAFKA_TOPIC_PREFIX`).

use clap::{Parser, Subcommand};
use common::config::KafkaConfig;
use sqlx::PgPool;

#[derive(Parser)]
#[command(
    version,
    about = "Operate the order pipeline: dead letters and invariant checks"
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
        #[arg(
            long,
            env = "ORDERS_DATABASE_URL",
            default_value = "postgres://shop:shop@127.0.0.1:5432/orders"
        )]
        orders_db: String,
        #[arg(
            long,
            env = "PAYMENTS_DATABASE_URL",
            default_value = "postgres://shop:shop@127.0.0.1:5432/payments"
        )]
        payments_db: String,
        #[arg(
            long,
            env = "INVENTORY_DATABASE_URL",
            default_value = "postgres://shop:shop@127.0.0.1:5432/inventory"
        )]
        inventory_db: String,
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
        Command::Check {
            orders_db,
            payments_db,
            inventory_db,
        } => {
            let sources = shopctl::invariants::Sources {
                orders: PgPool::connect(&orders_db).await?,
                payments: PgPool::connect(&payments_db).await?,
                inventory: PgPool::connect(&inventory_db).await?,
                kafka,
            };
            let report = shopctl::invariants::check(&sources).await?;
            println!("{}", serde_json::to_string_pretty(&report)?);
            if !report.ok() {
                std::process::exit(1);
            }
        }
    }
    Ok(())
}
