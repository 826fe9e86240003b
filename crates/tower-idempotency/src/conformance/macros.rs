//! The macro that writes the suite from one list of tests.

/// Writes each test once: as a public function, in the list [`all`] runs, and in the list
/// [`store_conformance!`](crate::store_conformance) expands, so no test is written without
/// running. `$d` is a `$`, for the macro this one defines.
macro_rules! suite {
    ($d:tt $( $(#[$meta:meta])* async fn $name:ident($store:ident) $body:block )*) => {
        $(
            $(#[$meta])*
            pub async fn $name<S: Store>($store: Arc<S>) $body
        )*

        /// Runs every test of the suite at once, each on a fresh store made by `make`; then
        /// panics naming each test that failed (their own panics say why).
        pub async fn all<S, F, Fut>(make: F)
        where
            S: Store,
            F: Fn() -> Fut,
            Fut: Future<Output = S>,
        {
            let make = &make;
            let tests: Vec<Pin<Box<dyn Future<Output = Result<(), &'static str>> + '_>>> = vec![
                $(
                    Box::pin(async move {
                        let store = Arc::new(make().await);
                        AssertUnwindSafe($name(store))
                            .catch_unwind()
                            .await
                            .map_err(|_| stringify!($name))
                    }),
                )*
            ];
            let failed: Vec<&str> = futures_util::future::join_all(tests)
                .await
                .into_iter()
                .filter_map(Result::err)
                .collect();
            assert!(failed.is_empty(), "the store fails the conformance tests {failed:?}");
        }

        /// Expands to one `#[test]` per rule of the store contract (each a function of
        /// [`conformance`](crate::conformance)), each running on a fresh store made by `$make`,
        /// an expression evaluating to a future of a [`Store`](crate::Store):
        ///
        /// ```ignore
        /// mod standalone {
        ///     tower_idempotency::store_conformance!(async { crate::store_on(&url()).await });
        /// }
        /// ```
        ///
        /// The expression is evaluated once per test, in the module the macro is called in,
        /// on the test's own runtime (see [`run`](crate::conformance::run)).
        #[macro_export]
        #[cfg_attr(docsrs, doc(cfg(feature = "conformance")))]
        macro_rules! store_conformance {
            ($d make:expr) => {
                $(
                    #[test]
                    fn $name() {
                        $d crate::conformance::run(async {
                            let store = ::std::sync::Arc::new($d make.await);
                            $d crate::conformance::$name(store).await;
                        });
                    }
                )*
            };
        }
    };
}
