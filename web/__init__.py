"""The browser client (``spaces.js``, typed by ``spaces.d.ts``) and the meeting page, as static
files the signaling service serves (``/sdk/spaces.js``, ``/``). No build step: what is here is
what browsers load."""
