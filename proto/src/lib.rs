//! shoal's gRPC protocol: the generated prost messages and tonic services of `shoal/v1/*.proto`.

/// Version 1 of the protocol.
pub mod v1 {
    #![allow(clippy::all, missing_docs)]
    tonic::include_proto!("shoal.v1");
}

/// Sizes that managers and workers must agree on: what a worker sends that ends up in the
/// Raft log. A manager enforces them whatever the worker does; a worker keeps to them so its
/// messages are not refused.
pub mod limits {
    use crate::v1::TaskStatus;

    /// Largest node description (prost-encoded) a dispatcher session may open with; a larger
    /// one is refused (`InvalidArgument`). A real one (hostname, platform, resources, version)
    /// is a few hundred bytes.
    pub const MAX_NODE_DESCRIPTION_BYTES: usize = 4 * 1024;
    /// Longest text field of a task status (`message`, `err`, `container_id`,
    /// `health_output`): a longer one is cut to this, ending in [`TRUNCATED_MARKER`].
    pub const MAX_STATUS_TEXT_BYTES: usize = 2 * 1024;
    /// What ends a status text that was cut.
    pub const TRUNCATED_MARKER: &str = " …[truncated]";

    const _: () = assert!(TRUNCATED_MARKER.len() < MAX_STATUS_TEXT_BYTES / 8);

    /// Cuts `text` to [`MAX_STATUS_TEXT_BYTES`] (on a character boundary, ending in
    /// [`TRUNCATED_MARKER`]); true if it was cut.
    pub fn bound_status_text(text: &mut String) -> bool {
        if text.len() <= MAX_STATUS_TEXT_BYTES {
            return false;
        }
        let mut cut = MAX_STATUS_TEXT_BYTES - TRUNCATED_MARKER.len();
        while !text.is_char_boundary(cut) {
            cut -= 1;
        }
        text.truncate(cut);
        text.push_str(TRUNCATED_MARKER);
        true
    }

    /// Cuts every text field of `status` with [`bound_status_text`]; true if any was cut.
    pub fn bound_task_status(status: &mut TaskStatus) -> bool {
        let mut cut = false;
        for t in [
            &mut status.message,
            &mut status.err,
            &mut status.container_id,
            &mut status.health_output,
        ] {
            cut |= bound_status_text(t);
        }
        cut
    }

    #[cfg(test)]
    mod tests {
        use super::*;

        #[test]
        fn a_long_status_text_is_cut_with_the_marker_and_short_ones_are_kept() {
            let mut short = "exit 1".to_string();
            assert!(!bound_status_text(&mut short));
            assert_eq!(short, "exit 1");
            let mut exact = "x".repeat(MAX_STATUS_TEXT_BYTES);
            assert!(!bound_status_text(&mut exact));
            // Multi-byte characters are never split.
            let mut long = "é".repeat(MAX_STATUS_TEXT_BYTES);
            assert!(bound_status_text(&mut long));
            assert!(long.len() <= MAX_STATUS_TEXT_BYTES, "{}", long.len());
            assert!(long.ends_with(TRUNCATED_MARKER));
            assert!(long.starts_with("éé"));

            let mut st = TaskStatus {
                err: "e".repeat(1 << 20),
                message: "started".into(),
                ..Default::default()
            };
            assert!(bound_task_status(&mut st));
            assert_eq!(st.message, "started");
            assert_eq!(st.err.len(), MAX_STATUS_TEXT_BYTES);
        }
    }
}

/// The control API's paged `List*` calls, as a client walks them: each request names where
/// to go on (`page_token`), each answer where the next page starts (`next_page_token`, empty
/// after the last). Each page is read on its own: an object made or removed between two pages
/// may be missing from the listing or in it.
pub mod paging {
    use crate::v1;

    /// A `List*` request.
    pub trait PageRequest: Clone {
        /// Asks for the page that starts at `token`.
        fn set_page_token(&mut self, token: String);
    }

    /// A `List*` answer.
    pub trait Page {
        /// What the list holds.
        type Item;
        /// Where the next page starts; empty after the last.
        fn next_page_token(&self) -> &str;
        /// The items of this page.
        fn into_items(self) -> Vec<Self::Item>;
    }

    macro_rules! paged {
        ($req:ident, $resp:ident, $field:ident, $item:ty) => {
            impl PageRequest for v1::$req {
                fn set_page_token(&mut self, token: String) {
                    self.page_token = token;
                }
            }
            impl Page for v1::$resp {
                type Item = $item;
                fn next_page_token(&self) -> &str {
                    &self.next_page_token
                }
                fn into_items(self) -> Vec<$item> {
                    self.$field
                }
            }
        };
    }

    paged!(
        ListServicesRequest,
        ListServicesResponse,
        services,
        v1::ServiceSummary
    );
    paged!(ListTasksRequest, ListTasksResponse, tasks, v1::Task);
    paged!(ListNodesRequest, ListNodesResponse, nodes, v1::Node);
    paged!(
        ListNetworksRequest,
        ListNetworksResponse,
        networks,
        v1::Network
    );
    paged!(ListSecretsRequest, ListSecretsResponse, secrets, v1::Secret);
    paged!(ListConfigsRequest, ListConfigsResponse, configs, v1::Config);

    /// Calls `call` for every page of the listing `req` starts (from its `page_token`) and
    /// hands each page's items to `each`, in order. A server that answers with the token it
    /// was given would never end the walk: that is an error.
    pub async fn each_page<Req, Resp, E, F, Fut>(
        mut req: Req,
        mut call: F,
        mut each: impl FnMut(Vec<Resp::Item>) -> Result<(), E>,
    ) -> Result<(), E>
    where
        Req: PageRequest,
        Resp: Page,
        E: From<tonic::Status>,
        F: FnMut(Req) -> Fut,
        Fut: std::future::Future<Output = Result<Resp, E>>,
    {
        let mut token = String::new();
        loop {
            let page = call(req.clone()).await?;
            let next = page.next_page_token().to_string();
            each(page.into_items())?;
            if next.is_empty() {
                return Ok(());
            }
            if next == token {
                return Err(tonic::Status::internal(
                    "the server repeated a page token: the listing would never end",
                )
                .into());
            }
            token = next.clone();
            req.set_page_token(next);
        }
    }

    /// Every item of the listing `req` starts, page after page (see [`each_page`]).
    pub async fn all_pages<Req, Resp, E, F, Fut>(req: Req, call: F) -> Result<Vec<Resp::Item>, E>
    where
        Req: PageRequest,
        Resp: Page,
        E: From<tonic::Status>,
        F: FnMut(Req) -> Fut,
        Fut: std::future::Future<Output = Result<Resp, E>>,
    {
        let mut all = Vec::new();
        each_page(req, call, |page| {
            all.extend(page);
            Ok(())
        })
        .await?;
        Ok(all)
    }
}
