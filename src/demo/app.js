/* jobcast demo page: built from clients/demo by `npm run build:demo` in clients/ */
