//! Attribute macros of the Weir Rust SDK: `#[transform]` and `#[filter]` turn a plain function
//! into a Weir plugin component.
//!
//! The function itself is left as written, so it stays callable from native tests; the WebAssembly
//! glue (WIT bindings, batching loop, config parsing, version stamp) is added only for `wasm32`.

use proc_macro::TokenStream;
use proc_macro2::{Span, TokenStream as TokenStream2};
use quote::quote;
use syn::{FnArg, ItemFn, Type, parse_macro_input, spanned::Spanned};

const WIT: &str = include_str!("../../../wit/plugin.wit");
const SDK_VERSION: &str = env!("CARGO_PKG_VERSION");

#[derive(Clone, Copy, PartialEq)]
enum Kind {
    Transform,
    Filter,
}

/// Turns `fn(Event) -> Outcome` (or `-> Result<Outcome, E>`), optionally with a second parameter
/// `&Config` where `Config: serde::de::DeserializeOwned`, into a transform plugin.
#[proc_macro_attribute]
pub fn transform(attr: TokenStream, item: TokenStream) -> TokenStream {
    expand(Kind::Transform, attr, item)
}

/// Turns `fn(&Event) -> bool` (`true` keeps the event), optionally with a second parameter
/// `&Config`, into a filter plugin.
#[proc_macro_attribute]
pub fn filter(attr: TokenStream, item: TokenStream) -> TokenStream {
    expand(Kind::Filter, attr, item)
}

fn expand(kind: Kind, attr: TokenStream, item: TokenStream) -> TokenStream {
    let attr = TokenStream2::from(attr);
    if !attr.is_empty() {
        return syn::Error::new(attr.span(), "this attribute takes no arguments").to_compile_error().into();
    }
    let function = parse_macro_input!(item as ItemFn);
    match glue(kind, &function) {
        Ok(glue) => quote!(#function #glue).into(),
        Err(error) => {
            let error = error.to_compile_error();
            quote!(#function #error).into()
        }
    }
}

fn signature_help(kind: Kind) -> &'static str {
    match kind {
        Kind::Transform => {
            "a Weir transform is `fn(event: Event) -> Outcome` or `fn(event: Event, config: &Config) -> Outcome` (the return type may also be `Result<Outcome, E>` with `E: Display`)"
        }
        Kind::Filter => "a Weir filter is `fn(event: &Event) -> bool` or `fn(event: &Event, config: &Config) -> bool`",
    }
}

/// The `C` of a `&C` parameter.
fn config_type(arg: &FnArg, kind: Kind) -> syn::Result<Type> {
    if let FnArg::Typed(pat) = arg
        && let Type::Reference(reference) = pat.ty.as_ref()
        && reference.mutability.is_none()
    {
        return Ok((*reference.elem).clone());
    }
    Err(syn::Error::new_spanned(
        arg,
        format!("the config parameter must be a shared reference, `&Config`; {}", signature_help(kind)),
    ))
}

fn wit_version() -> String {
    WIT.lines()
        .find_map(|line| line.trim().strip_prefix("package weir:plugin@"))
        .map(|rest| rest.trim_end_matches(';').trim().to_string())
        .unwrap_or_else(|| "unknown".to_string())
}

fn glue(kind: Kind, function: &ItemFn) -> syn::Result<TokenStream2> {
    let sig = &function.sig;
    if sig.asyncness.is_some() || !sig.generics.params.is_empty() || sig.receiver().is_some() {
        return Err(syn::Error::new_spanned(sig, signature_help(kind)));
    }
    let config = match sig.inputs.len() {
        1 => None,
        2 => Some(config_type(&sig.inputs[1], kind)?),
        _ => return Err(syn::Error::new_spanned(&sig.inputs, signature_help(kind))),
    };
    if let (Kind::Filter, FnArg::Typed(pat)) = (kind, &sig.inputs[0])
        && !matches!(pat.ty.as_ref(), Type::Reference(_))
    {
        return Err(syn::Error::new_spanned(&pat.ty, signature_help(kind)));
    }
    if matches!(sig.output, syn::ReturnType::Default) {
        return Err(syn::Error::new_spanned(sig, signature_help(kind)));
    }

    let name = &sig.ident;
    let config_ty = config.clone().unwrap_or_else(|| syn::parse_quote!(()));
    let parse_config = if config.is_some() {
        quote!(::weir_sdk::parse_config::<#config_ty>(&config)?)
    } else {
        quote!(::weir_sdk::expect_no_config(&config)?)
    };
    let call = |event: TokenStream2| {
        if config.is_some() {
            quote!(super::#name(#event, config))
        } else {
            quote!({ let _ = config; super::#name(#event) })
        }
    };
    let (world, interface, body) = match kind {
        Kind::Transform => {
            let call = call(quote!(from_wit(event)));
            (
                "transform",
                quote!(exports::weir::plugin::transform_handler::Guest),
                quote! {
                    fn handle(events: ::std::vec::Vec<WitEvent>) -> ::std::vec::Vec<WitOutcome> {
                        with_config(|config| match config {
                            Some(config) => events
                                .into_iter()
                                .map(|event| to_wit_outcome(::weir_sdk::IntoOutcome::into_outcome(#call)))
                                .collect(),
                            None => events
                                .iter()
                                .map(|_| WitOutcome::Reject(NOT_CONFIGURED.to_string()))
                                .collect(),
                        })
                    }
                },
            )
        }
        Kind::Filter => {
            let call = call(quote!(&from_wit(event)));
            (
                "filter",
                quote!(exports::weir::plugin::filter_handler::Guest),
                quote! {
                    fn handle(events: ::std::vec::Vec<WitEvent>) -> ::std::vec::Vec<bool> {
                        with_config(|config| match config {
                            Some(config) => events.into_iter().map(|event| #call).collect(),
                            // A filter cannot reject: an unconfigured instance keeps nothing.
                            None => events.iter().map(|_| false).collect(),
                        })
                    }
                },
            )
        }
    };

    let meta = format!(
        r#"{{"sdk":"weir-sdk-rust","sdk_version":"{SDK_VERSION}","wit":"weir:plugin@{}","world":"{world}"}}"#,
        wit_version()
    );
    let meta_bytes = syn::LitByteStr::new(meta.as_bytes(), Span::call_site());
    let meta_len = meta.len();
    let wit = syn::LitStr::new(WIT, Span::call_site());

    Ok(quote! {
        #[cfg(target_arch = "wasm32")]
        #[doc(hidden)]
        #[allow(clippy::all, unused)]
        mod __weir_plugin_glue {
            // The config type is named as the user wrote it, relative to their module.
            #[allow(unused_imports)]
            use super::*;

            ::weir_sdk::__private::wit_bindgen::generate!({
                inline: #wit,
                world: #world,
                runtime_path: "::weir_sdk::__private::wit_bindgen::rt",
            });

            use weir::plugin::types::{Event as WitEvent, Outcome as WitOutcome};

            const NOT_CONFIGURED: &str = "plugin instance was not configured: the host must call `configure` first";

            /// Records the SDK and WIT versions in the component; `weir plugin inspect` reads it.
            #[unsafe(link_section = "weir:plugin-meta")]
            #[used]
            static WEIR_PLUGIN_META: [u8; #meta_len] = *#meta_bytes;

            ::std::thread_local! {
                static CONFIG: ::std::cell::OnceCell<#config_ty> = const { ::std::cell::OnceCell::new() };
            }

            fn with_config<R>(f: impl FnOnce(Option<&#config_ty>) -> R) -> R {
                CONFIG.with(|cell| f(cell.get()))
            }

            fn from_wit(e: WitEvent) -> ::weir_sdk::Event {
                ::weir_sdk::Event {
                    id: e.id, source: e.source, entity: e.entity, op: e.op, key: e.key,
                    time: e.time, subject: e.subject, headers: e.headers, data: e.data,
                    old: e.old, position: e.position,
                }
            }

            fn to_wit(e: ::weir_sdk::Event) -> WitEvent {
                WitEvent {
                    id: e.id, source: e.source, entity: e.entity, op: e.op, key: e.key,
                    time: e.time, subject: e.subject, headers: e.headers, data: e.data,
                    old: e.old, position: e.position,
                }
            }

            fn to_wit_outcome(outcome: ::weir_sdk::Outcome) -> WitOutcome {
                match outcome {
                    ::weir_sdk::Outcome::Drop => WitOutcome::Drop,
                    ::weir_sdk::Outcome::Keep(e) => WitOutcome::Keep(to_wit(e)),
                    ::weir_sdk::Outcome::Split(events) => WitOutcome::Split(events.into_iter().map(to_wit).collect()),
                    ::weir_sdk::Outcome::Reject(reason) => WitOutcome::Reject(reason),
                }
            }

            struct Plugin;

            impl #interface for Plugin {
                fn configure(config: ::std::string::String) -> ::std::result::Result<(), ::std::string::String> {
                    let parsed: #config_ty = #parse_config;
                    CONFIG.with(|cell| cell.set(parsed).map_err(|_| "configure was called twice on one instance".to_string()))
                }

                #body
            }

            export!(Plugin);
        }
    })
}
