from outbox_cli.main import main

raise SystemExit(main())
