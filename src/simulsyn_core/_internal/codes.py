"""Short codes in magic-wormhole's style: ``7-guitarist-revenge``.

The number (the *nameplate*) is what the broker pairs by: it hands out the smallest free
one. The words are what only the two people share: they key the PAKE (secure.py) and
never reach the broker. Two words from the PGP word list (odd list, then even list, as
magic-wormhole does) carry 16 bits: a stranger who takes the other's place at the broker
has one guess, right once in 65,536, and a wrong guess ends the session for both.
"""

from __future__ import annotations

import re
import secrets

DEFAULT_WORDS = 2
NAMEPLATE_RE = re.compile(r"[1-9][0-9]{0,5}", re.ASCII)  # 1..999999, ASCII digits only
_CODE_RE = re.compile(r"([1-9][0-9]{0,5})((?:-[a-z]+){1,8})", re.ASCII)

# The PGP word list (Juola and Zimmermann, 1995): 256 "even" words of two syllables and
# 256 "odd" words of three, chosen to be told apart when read aloud.
_EVEN = """
aardvark absurd accrue acme adrift adult afflict ahead aimless algol allow alone ammo
ancient apple artist assume athens atlas aztec baboon backfield backward banjo beaming
bedlamp beehive beeswax befriend belfast berserk billiard bison blackjack blockade
blowtorch bluebird bombast bookshelf brackish breadline breakup brickyard briefcase
burbank button buzzard cement chairlift chatter checkup chisel choking chopper
christmas clamshell classic classroom cleanup clockwork cobra commence concert cowbell
crackdown cranky crowfoot crucial crumpled crusade cubic dashboard deadbolt deckhand
dogsled dragnet drainage dreadful drifter dropper drumbeat drunken dupont dwelling
eating edict egghead eightball endorse endow enlist erase escape exceed eyeglass
eyetooth facial fallout flagpole flatfoot flytrap fracture framework freedom frighten
gazelle geiger glitter glucose goggles goldfish gremlin guidance hamlet highchair
hockey indoors indulge inverse involve island jawbone keyboard kickoff kiwi klaxon
locale lockup merit minnow miser mohawk mural music necklace neptune newborn nightbird
oakland obtuse offload optic orca payday peachy pheasant physique playhouse pluto
preclude prefer preshrunk printer prowler pupil puppy python quadrant quiver quota
ragtime ratchet rebirth reform regain reindeer rematch repay retouch revenge reward
rhythm ribcage ringbolt robust rocker ruffled sailboat sawdust scallion scenic
scorecard scotland seabird select sentence shadow shamrock showgirl skullcap skydive
slingshot slowdown snapline snapshot snowcap snowslide solo southward soybean spaniel
spearhead spellbind spheroid spigot spindle spyglass stagehand stagnate stairway
standard stapler steamship sterling stockman stopwatch stormy sugar surmount suspense
sweatband swelter tactics talon tapeworm tempest tiger tissue tonic topmost tracker
transit trauma treadmill trojan trouble tumor tunnel tycoon uncut unearth unwind
uproot upset upshot vapor village virus vulcan waffle wallet watchword wayside willow
woodlark zulu
""".split()

_ODD = """
adroitness adviser aftermath aggregate alkali almighty amulet amusement antenna
applicant apollo armistice article asteroid atlantic atmosphere autopsy babylon
backwater barbecue belowground bifocals bodyguard bookseller borderline bottomless
bradbury bravado brazilian breakaway burlington businessman butterfat camelot
candidate cannonball capricorn caravan caretaker celebrate cellulose certify
chambermaid cherokee chicago clergyman coherence combustion commando company component
concurrent confidence conformist congregate consensus consulting corporate corrosion
councilman crossover crucifix cumbersome customer dakota decadence december decimal
designing detector detergent determine dictator dinosaur direction disable disbelief
disruptive distortion document embezzle enchanting enrollment enterprise equation
equipment escapade eskimo everyday examine existence exodus fascinate filament finicky
forever fortitude frequency gadgetry galveston getaway glossary gossamer graduate
gravity guitarist hamburger hamilton handiwork hazardous headwaters hemisphere
hesitate hideaway holiness hurricane hydraulic impartial impetus inception indigo
inertia infancy inferno informant insincere insurgent integrate intention inventive
istanbul jamaica jupiter leprosy letterhead liberty maritime matchmaker maverick
medusa megaton microscope microwave midsummer millionaire miracle misnomer molasses
molecule montana monument mosquito narrative nebula newsletter norwegian october ohio
onlooker opulent orlando outfielder pacific pandemic pandora paperweight paragon
paragraph paramount passenger pedigree pegasus penetrate perceptive performance
pharmacy phonetic photograph pioneer pocketful politeness positive potato processor
provincial proximate puberty publisher pyramid quantity racketeer rebellion recipe
recover repellent replica reproduce resistor responsive retraction retrieval
retrospect revenue revival revolver sandalwood sardonic saturday savagery scavenger
sensation sociable souvenir specialist speculate stethoscope stupendous supportive
surrender suspicious sympathy tambourine telephone therapist tobacco tolerance
tomorrow torpedo tradition travesty trombonist truncated typewriter ultimate undaunted
underfoot unicorn unify universe unravel upcoming vacancy vagabond vertigo virginia
visitor vocalist voyager warranty waterloo whimsical wichita wilmington wyoming
yesteryear yucatan
""".split()

_KNOWN = frozenset(_EVEN) | frozenset(_ODD)
assert len(_EVEN) == len(_ODD) == 256


class CodeError(ValueError):
    """A code that cannot be right (said to the user as is)."""


def make_words(count: int = DEFAULT_WORDS) -> str:
    """``count`` random words (odd list first, then alternating), joined by ``-``."""
    return "-".join(secrets.choice(_ODD if i % 2 == 0 else _EVEN) for i in range(count))


def make_code(nameplate: str, words: str) -> str:
    return f"{nameplate}-{words}"


def parse_code(text: str) -> tuple[str, str]:
    """``(nameplate, words)`` of a code such as ``7-guitarist-revenge``; raises CodeError.
    Case and surrounding spaces do not matter; a word outside the list is refused (a typo
    would otherwise only show as a failed authentication)."""
    code = text.strip().lower()
    m = _CODE_RE.fullmatch(code)
    if m is None:
        raise CodeError(f"{text!r} is not a code: a number, then words, joined by '-' "
                        "(e.g. 7-guitarist-revenge)")
    words = m.group(2)[1:]
    unknown = [w for w in words.split("-") if w not in _KNOWN]
    if unknown:
        raise CodeError(f"{unknown[0]!r} is not one of the code's words (a typo?)")
    return m.group(1), words
