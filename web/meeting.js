// The meeting page (served at /): join with a pasted token, or (make run on this machine) with
// a dev token from POST /dev/token; a grid of participants with names, mute state and the
// active speaker; camera, microphone and screen-share buttons. Built on our own client only.
import {
  ParticipantRole,
  Space,
  SpaceEvent,
  TrackKind,
  TrackSource,
  getDisplayMedia,
  getUserMedia,
} from "./sdk/spaces.js";

const $ = (id) => document.getElementById(id);
const params = new URLSearchParams(location.search);
let space = null;
let local = null;
const mine = {}; // source -> LocalTrack
const tiles = new Map(); // key -> tile element

function status(text, kind = "") {
  $("status").textContent = text;
  $("status").className = kind;
}

// --- joining --------------------------------------------------------------------------------

function spaceOf(token) {
  try {
    return JSON.parse(atob(token.split(".")[1].replace(/-/g, "+").replace(/_/g, "/"))).sub || "";
  } catch {
    return "";
  }
}

async function devToken() {
  const response = await fetch("dev/token", {
    method: "POST",
    headers: { "Content-Type": "application/json" },
    body: JSON.stringify(params.get("space") ? { space_id: params.get("space") } : {}),
  });
  if (!response.ok) throw new Error((await response.text()).trim() || `dev token: HTTP ${response.status}`);
  return (await response.json()).token;
}

async function join(getToken) {
  const name = $("name").value.trim();
  localStorage.setItem("spaces.name", name);
  for (const button of document.querySelectorAll("#lobby button")) button.disabled = true;
  status("Joining…");
  try {
    const token = await getToken();
    space = new Space(token, { displayName: name });
    listen(space);
    local = await space.join();
    const spaceId = spaceOf(token);
    if (spaceId) history.replaceState(null, "", `?space=${encodeURIComponent(spaceId)}`);
    $("invite-link").href = $("invite-link").textContent = location.href;
    $("invite").hidden = false;
  } catch (error) {
    space?.leave();
    space = null;
    status(`Could not join: ${error.message}`, "error");
    for (const button of document.querySelectorAll("#lobby button")) button.disabled = false;
    return;
  }
  $("lobby").hidden = true;
  $("meeting").hidden = false;
  $("display-name").value = local.displayName;
  status(`In the space as ${local.displayName || local.id}`);
  render(local);
  if (local.role === ParticipantRole.Subscriber) {
    for (const id of ["camera", "microphone", "screen"]) $(id).disabled = true;
    status("In the space as a viewer (your token cannot publish)");
    return;
  }
  try {
    await publish(await getUserMedia({ audio: true, video: true }));
  } catch (error) {
    status(`Joined without camera and microphone: ${error.message}`, "warning");
  }
}

async function publish(tracks) {
  await local.publishTracks(tracks);
  for (const track of tracks) {
    mine[track.source] = track;
    track.track.addEventListener("ended", () => unpublish(track.source));
  }
  render(local);
}

async function unpublish(source) {
  const track = mine[source];
  if (!track) return;
  delete mine[source];
  await local.unpublishTracks([track], { stop: true }).catch(() => {});
  render(local);
}

function leave(message) {
  space?.leave();
  space = null;
  local = null;
  for (const source of Object.keys(mine)) {
    mine[source].stop();
    delete mine[source];
  }
  for (const tile of tiles.values()) tile.remove();
  tiles.clear();
  $("meeting").hidden = true;
  $("lobby").hidden = false;
  for (const button of document.querySelectorAll("#lobby button")) button.disabled = false;
  status(message);
}

// --- the grid -------------------------------------------------------------------------------

function listen(s) {
  const rerender = (participant) => render(participant);
  s.on(SpaceEvent.ParticipantJoined, rerender);
  s.on(SpaceEvent.ParticipantLeft, (p) => {
    for (const [key, tile] of tiles) {
      if (key.startsWith(`${p.connectionId}/`)) {
        tile.remove();
        tiles.delete(key);
      }
    }
  });
  for (const event of [
    SpaceEvent.ParticipantTrackPublished,
    SpaceEvent.ParticipantTrackUnpublished,
    SpaceEvent.ParticipantTrackSubscribed,
    SpaceEvent.ParticipantTrackUnsubscribed,
    SpaceEvent.ParticipantTrackMuted,
    SpaceEvent.ParticipantTrackUnmuted,
    SpaceEvent.ParticipantDisplayNameChanged,
  ]) {
    s.on(event, rerender);
  }
  s.on(SpaceEvent.ActiveSpeakersChanged, (speakers) => {
    const speaking = new Set(speakers.map((sp) => sp.participant.connectionId));
    for (const [key, tile] of tiles) tile.classList.toggle("speaking", speaking.has(key.split("/")[0]));
  });
  s.on(SpaceEvent.LocalParticipantReconnecting, () => status("Connection lost: reconnecting…", "warning"));
  s.on(SpaceEvent.LocalParticipantReconnected, (me) => {
    status("Reconnected");
    for (const tile of tiles.values()) tile.remove();
    tiles.clear();
    render(me);
    for (const p of s.remoteParticipants.values()) render(p);
  });
  s.on(SpaceEvent.LocalParticipantReconnectFailed, (error) => leave(`Disconnected: ${error.message}`));
  s.on(SpaceEvent.LocalParticipantDisconnected, (error) =>
    leave(`The server ended the session: ${error.message}`),
  );
}

function tile(participant, kind) {
  const key = `${participant.connectionId}/${kind}`;
  let el = tiles.get(key);
  if (!el) {
    el = document.createElement("figure");
    el.className = "tile";
    el.dataset.participant = participant.id;
    el.dataset.kind = kind;
    el.classList.toggle("local", participant === local);
    el.innerHTML =
      '<video autoplay playsinline muted></video><figcaption><span class="name"></span><span class="state"></span></figcaption>';
    $("grid").append(el);
    tiles.set(key, el);
  }
  return el;
}

/** One tile for the camera (always, so everyone is seen), one more for a screen share. */
function render(participant) {
  if (!space || !participant.connectionId) return;
  const tracks = participant.getTracks();
  const find = (source) => tracks.find((t) => t.source === source);
  const camera = find(TrackSource.Camera);
  const microphone = find(TrackSource.Microphone);
  const screen = find(TrackSource.Screenshare);
  const name = participant.displayName || participant.id;
  const main = tile(participant, "camera");
  show(main, camera, participant === local ? `${name} (you)` : name);
  const state = [];
  if (!microphone) state.push("no mic");
  else if (microphone.muted) state.push("mic off");
  if (camera?.muted) state.push("camera off");
  main.querySelector(".state").textContent = state.join(" · ");
  main.classList.toggle("camera-off", !camera || camera.muted);
  if (participant !== local) {
    // Remote audio plays from a hidden element of the tile.
    let audio = main.querySelector("audio");
    if (microphone && !audio) audio = main.appendChild(document.createElement("audio"));
    if (microphone) microphone.attach(audio);
  }
  const key = `${participant.connectionId}/screenshare`;
  if (screen) show(tile(participant, "screenshare"), screen, `${name}'s screen`);
  else if (tiles.has(key)) {
    tiles.get(key).remove();
    tiles.delete(key);
  }
  if (participant === local) controls();
}

function show(el, track, caption) {
  el.querySelector(".name").textContent = caption;
  const video = el.querySelector("video");
  if (track && track.kind === TrackKind.Video) track.attach(video);
  else video.srcObject = null;
}

function controls() {
  const set = (id, on, label) => {
    $(id).setAttribute("aria-pressed", String(on));
    $(id).textContent = label;
  };
  const camera = mine[TrackSource.Camera];
  const microphone = mine[TrackSource.Microphone];
  set("camera", !!camera && !camera.muted, camera && !camera.muted ? "Camera on" : "Camera off");
  set(
    "microphone",
    !!microphone && !microphone.muted,
    microphone && !microphone.muted ? "Mic on" : "Mic off",
  );
  set(
    "screen",
    !!mine[TrackSource.Screenshare],
    mine[TrackSource.Screenshare] ? "Stop sharing" : "Share screen",
  );
}

// --- controls -------------------------------------------------------------------------------

async function toggle(source, options) {
  const track = mine[source];
  try {
    if (!track) await publish(await getUserMedia(options));
    else if (track.muted) track.unMute();
    else track.mute();
  } catch (error) {
    status(`${source}: ${error.message}`, "error");
  }
  render(local);
}

$("camera").addEventListener("click", () => toggle(TrackSource.Camera, { video: true }));
$("microphone").addEventListener("click", () => toggle(TrackSource.Microphone, { audio: true }));
$("screen").addEventListener("click", async () => {
  try {
    if (mine[TrackSource.Screenshare]) await unpublish(TrackSource.Screenshare);
    else await publish(await getDisplayMedia({ video: true }));
  } catch (error) {
    status(`Screen share: ${error.message}`, "error");
  }
});
$("rename").addEventListener("submit", async (event) => {
  event.preventDefault();
  try {
    await local.setDisplayName($("display-name").value.trim());
    localStorage.setItem("spaces.name", local.displayName);
    status(`Now called ${local.displayName}`);
  } catch (error) {
    status(`Rename: ${error.message}`, "error");
  }
});
$("leave").addEventListener("click", () => leave("You left the space"));
$("join-dev").addEventListener("click", () => join(devToken));
$("token-form").addEventListener("submit", (event) => {
  event.preventDefault();
  join(async () => $("token").value.trim());
});
$("name").value = localStorage.getItem("spaces.name") ?? "";
if (params.get("space")) status(`Joining space ${params.get("space")}: choose a way below`);
