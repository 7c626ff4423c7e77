use weir_sdk::{Event, Outcome};

struct Config;

#[weir_sdk::transform]
fn handle(event: Event, config: Config) -> Outcome {
    Outcome::Keep(event)
}

fn main() {}
