use weir_sdk::Event;

#[weir_sdk::filter]
fn keep(event: Event) -> bool {
    event.op == "insert"
}

fn main() {}
