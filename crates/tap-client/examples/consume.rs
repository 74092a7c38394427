//! Prints every event of a tap and acks it: `cargo run -p tap-client --example consume --
//! http://127.0.0.1:2480 [admin-password]`. Stops on Ctrl-C.

use tap_client::{Channel, Event, EventBody};

#[tokio::main]
async fn main() -> Result<(), Box<dyn std::error::Error>> {
    let mut args = std::env::args().skip(1);
    let base = args
        .next()
        .unwrap_or_else(|| "http://127.0.0.1:2480".into());
    let channel = Channel::new(base.parse()?, args.next());
    channel
        .consume(
            |event: Event| async move {
                match &event.body {
                    EventBody::Record { record } => println!(
                        "{} {:?} at://{}/{}/{}",
                        event.id, record.action, record.did, record.collection, record.rkey
                    ),
                    EventBody::Identity { identity } => {
                        println!("{} identity {} {}", event.id, identity.did, identity.handle);
                    }
                }
                Ok::<(), std::convert::Infallible>(())
            },
            async {
                let _ = tokio::signal::ctrl_c().await;
            },
        )
        .await?;
    Ok(())
}
